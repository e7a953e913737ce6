"""LocalServices: what grpcmux answers itself, on grpcio, in a thread of its own.

Discovery, health and server reflection run on a ``grpc.aio`` server whose asyncio
loop has its own thread; the router reaches it like any other upstream, over a
private UNIX socket. Every grpc object is made in ``start`` (after twistd forked:
grpc does not survive a fork); the reactor learns of the stop through a Deferred.

Discovery checks proxy tokens itself (the router passes ``grpcmux-token`` on to
these services); health and reflection describe only the proxy and need none.
"""

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.rpc.discovery import AsyncDiscoveryServicer

DISCOVERY_SERVICE = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name
LOCAL_SERVICES = (DISCOVERY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
# How long start() waits for the asyncio thread to bind the socket.
_START_TIMEOUT = 10.0


class LocalServices:
    """A grpc.aio server with Discovery, health and reflection on ``unix:<socket_path>``.

    ``tokens`` (ProxyTokens or None) decide who sees which ids in Discovery;
    ``watch_queue_limit``: registry changes kept for Watch callers (from the
    settings' ``watch_queue_limit``).
    """

    _log = Logger()

    def __init__(self, reactor, registry, socket_path, tokens, watch_queue_limit):
        self._reactor = reactor
        self._registry = registry
        self.socket_path = socket_path
        self._tokens = tokens
        self._watch_queue_limit = watch_queue_limit
        self._loop = None
        self._thread = None
        self._server = None
        self._discovery = None
        self._health = None

    @property
    def discovery(self):
        """The Discovery servicer (AsyncDiscoveryServicer) once started, else None."""
        return self._discovery

    def start(self):
        """Bind and start; waits (briefly) for the loop thread. OSError if it cannot bind."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpcmux-local", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(_START_TIMEOUT)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _run_loop(self):
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # grpc's own tasks end with the loop, not destroyed while pending.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _start(self):
        self._discovery = AsyncDiscoveryServicer(self._reactor, self._registry, self._tokens,
                                                 self._watch_queue_limit)
        self._health = health.aio.HealthServicer()
        server = grpc.aio.server()
        discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(self._discovery, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(LOCAL_SERVICES, server)
        try:
            server.add_insecure_port(f"unix:{self.socket_path}")
        except RuntimeError as error:  # grpcio's only word on a failed bind
            raise OSError(f"cannot listen on {self.socket_path}") from error
        await server.start()
        for name in ("", DISCOVERY_SERVICE):
            await self._health.set(name, _SERVING)
        self._server = server

    def begin_shutdown(self):
        """Health says NOT_SERVING and Watch streams end (status OK): they never
        end by themselves, and calls must end for the proxy to drain."""
        if self._server is None:
            return

        async def begin():
            await self._health.enter_graceful_shutdown()
            self._discovery.close()

        asyncio.run_coroutine_threadsafe(begin(), self._loop)

    def set_serving(self, service, serving):
        """Set a health status (e.g. ``grpcmux.cluster``) from the reactor."""
        status = _SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._health.set(service, status), self._loop)

    def stop(self, grace):
        """Stop within ``grace`` seconds; a Deferred firing once the thread is done."""
        server = self._server
        if server is None:
            return succeed(None)

        async def stop():
            await self._health.enter_graceful_shutdown()
            self._discovery.close()  # Watch streams never end by themselves
            await server.stop(grace)  # not self._server: None by the time this runs

        d = Deferred()
        future = asyncio.run_coroutine_threadsafe(stop(), self._loop)

        loop = self._loop
        future.add_done_callback(lambda f: self._reactor.callFromThread(_fire, d, f))
        self._server = None
        # The loop stops from the reactor, after grpc's own tasks had their turn.
        return d.addBoth(_passing(lambda: loop.call_soon_threadsafe(loop.stop)))


def _passing(action):
    def run(result):
        action()
        return result

    return run


def _fire(d, future):
    error = future.exception()
    if error is None:
        d.callback(None)
    else:
        d.errback(error)
