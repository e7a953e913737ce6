"""ProxyService: the Twisted service owning the proxy endpoint's grpc server.

Every grpc object is made in startService, which twistd calls after it forked (grpc
does not survive a fork). The server runs on its own threads; the reactor only hands
it registry changes and learns of its stop through a Deferred.

Two engines (see :mod:`grpcmux.rpc.proxy`): by default a ``grpc.aio`` server on one
dedicated asyncio thread, where a call costs a task, not a thread (measured with
1000 concurrent bidi streams: about 8x the relayed messages per second of the
threaded server, which needs two threads per stream). With ``authority_domain`` set
the threaded ``grpc.server`` is used, as only it exposes a call's ``:authority``.

Security (:mod:`grpcmux.rpc.security`) is the same for both: with ``tls`` the one
port (proxy, Discovery, health, reflection alike) speaks only TLS, and requires
client certificates when ``tls`` has a client CA; with ``tokens`` every forwarded
call and every Discovery call must carry an end-user token. Health and reflection
answered here need none: they describe the proxy itself, never a client.
"""

import asyncio
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import DISCONNECTED
from grpcmux.rpc.discovery import WATCH_QUEUE_LIMIT, AsyncDiscoveryServicer, DiscoveryServicer
from grpcmux.rpc.proxy import AsyncProxy, HandlerTable, ThreadedProxy, message_size_options
from grpcmux.rpc.threads import defer_to_thread

DISCOVERY_SERVICE = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name
_LOCAL_SERVICES = (DISCOVERY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
# How long startService waits for the asyncio thread to bind the port.
_START_TIMEOUT = 10.0


class ProxyService(Service):
    """The proxy endpoint: Discovery, health, reflection, and forwarding to clients.

    ``max_concurrent_calls`` bounds the calls in progress; calls beyond it fail with
    RESOURCE_EXHAUSTED instead of queueing (threaded engine: also its thread count).
    ``max_calls_per_client`` bounds the forwarded calls in progress to one client
    (None: no bound); beyond it likewise RESOURCE_EXHAUSTED.
    ``shutdown_grace`` is how long stopService lets running calls finish before
    cancelling them.  ``call_observer``, if given, is called (on a grpc thread) as each
    forwarded call starts and returns ``finished(code_name)`` for when it ends.
    ``tls`` (ServerTLS) and ``tokens`` (ProxyTokens) secure the endpoint; None: off.
    ``watch_queue_limit``: events that may wait for one Discovery Watch caller.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        registry,
        listen_address: str,
        authority_domain=None,
        default_client_id=None,
        max_message_size=None,
        max_concurrent_calls=10000,
        max_calls_per_client=1000,
        shutdown_grace=10.0,
        call_observer=None,
        tls=None,
        tokens=None,
        watch_queue_limit=WATCH_QUEUE_LIMIT,
    ):
        self._reactor = reactor
        self._registry = registry
        self.listen_address = listen_address
        self.authority_domain = authority_domain
        self.default_client_id = default_client_id
        self.max_message_size = max_message_size
        self.max_concurrent_calls = max_concurrent_calls
        self.max_calls_per_client = max_calls_per_client
        self.shutdown_grace = shutdown_grace
        self.call_observer = call_observer
        self.tls = tls
        self.tokens = tokens
        self.watch_queue_limit = watch_queue_limit
        self.port = None
        self._engine = None
        self._unsubscribe = None

    def startService(self):
        engine = _ThreadedEngine if self.authority_domain else _AsyncEngine
        self._engine = engine(self._reactor, self._registry, self)
        self.port = self._engine.start()
        self._unsubscribe = self._registry.subscribe(self._registry_changed)
        super().startService()
        self._log.info("proxy endpoint listening on {address} (port {port}, {security})",
                       address=self.listen_address, port=self.port,
                       security=self._describe_security())
        if self.tokens is not None and self.tls is None:
            self._log.warn("proxy tokens are checked but travel in plaintext: "
                           "serve the proxy endpoint over TLS (--proxy-tls-cert)")

    def _describe_security(self):
        transport = "plaintext"
        if self.tls is not None:
            transport = "mTLS" if self.tls.requires_client_certificates else "TLS"
        if self.tokens is None:
            return f"{transport}, no end-user tokens"
        return f"{transport}, {len(self.tokens)} end-user token(s)"

    def _registry_changed(self, event):
        if event.kind == DISCONNECTED:
            if event.graceful:
                self._engine.client_leaving(event.info)
            else:
                self._engine.client_gone(event.info)

    def when_client_ready(self, client_id, timeout=10.0):
        """A Deferred firing once the proxy's channel to ``client_id`` is connected.

        For readiness checks and tests: after an outage grpc reconnects after a short
        backoff, and calls made before fail fast. Errbacks on timeout, or with
        RoutingError when the client is not connected.
        """
        return self._engine.when_client_ready(client_id, timeout)

    def stopService(self):
        super().stopService()
        engine, self._engine = self._engine, None
        if engine is None:
            return None
        self._unsubscribe()
        d = engine.stop(self.shutdown_grace)
        d.addCallback(lambda _: self._log.info("proxy endpoint stopped"))
        return d


def _local_handlers(discovery, health_servicer, reflection_servicer):
    """(always local, local unless routed) handler tables for the proxy."""
    always, unrouted = HandlerTable(), HandlerTable()
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(discovery, always)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, unrouted)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_servicer, unrouted)
    return dict(local=always.handlers, local_unrouted=unrouted.handlers)


def _server_args(settings, handler):
    return dict(
        handlers=[handler],
        options=message_size_options(settings.max_message_size),
        maximum_concurrent_rpcs=settings.max_concurrent_calls,
    )


class _AsyncEngine:
    """A grpc.aio server on an asyncio loop in a thread of its own."""

    def __init__(self, reactor, registry, settings):
        self._reactor = reactor
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="grpcmux-proxy", daemon=True)
        self._discovery = AsyncDiscoveryServicer(reactor, registry, settings.tokens,
                                                 settings.watch_queue_limit)
        self._health = health.aio.HealthServicer()
        self._proxy = AsyncProxy(
            registry,
            self._loop,
            default_client_id=settings.default_client_id,
            max_message_size=settings.max_message_size,
            call_observer=settings.call_observer,
            max_calls_per_client=settings.max_calls_per_client,
            tokens=settings.tokens,
            **_local_handlers(self._discovery, self._health,
                              reflection.aio.ReflectionServicer(_LOCAL_SERVICES)),
        )
        self._server = None

    def _run_loop(self):
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self):
        server = grpc.aio.server(**_server_args(self._settings, self._proxy))
        port = _bind(server, self._settings.listen_address, self._settings.tls)
        await server.start()
        for name in ("", DISCOVERY_SERVICE):
            await self._health.set(name, _SERVING)
        self._server = server
        return port

    def start(self):
        """Bind and start; returns the port. Waits (briefly) for the loop thread."""
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(
                _START_TIMEOUT)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def client_gone(self, info):
        self._proxy.client_gone(info)  # hands over to the loop; never blocks

    def client_leaving(self, info):
        self._proxy.client_leaving(info)  # likewise

    def when_client_ready(self, client_id, timeout):
        async def ready():
            channel = self._proxy.channel_for(client_id)
            await asyncio.wait_for(channel.channel_ready(), timeout)

        return self._deferred(ready())

    def _deferred(self, coroutine):
        """Run a coroutine on the loop; a Deferred with its outcome, on the reactor."""
        d = Deferred()
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        future.add_done_callback(lambda f: self._reactor.callFromThread(_fire, d, f))
        return d

    def stop(self, grace):
        async def stop():
            await self._health.enter_graceful_shutdown()
            self._discovery.close()  # Watch streams never end by themselves
            await self._server.stop(grace)  # cancels what still runs after grace
            await self._proxy.aclose()

        def stopped(result):
            self._loop.call_soon_threadsafe(self._loop.stop)
            return result

        return self._deferred(stop()).addBoth(stopped)


class _ThreadedEngine:
    """A threaded grpc.server: a worker thread per call; it can see ``:authority``."""

    def __init__(self, reactor, registry, settings):
        self._reactor = reactor
        self._discovery = DiscoveryServicer(reactor, registry, settings.tokens,
                                            settings.watch_queue_limit)
        self._health = health.HealthServicer()
        self._proxy = ThreadedProxy(
            registry,
            authority_domain=settings.authority_domain,
            default_client_id=settings.default_client_id,
            max_message_size=settings.max_message_size,
            call_observer=settings.call_observer,
            max_calls_per_client=settings.max_calls_per_client,
            tokens=settings.tokens,
            **_local_handlers(self._discovery, self._health,
                              reflection.ReflectionServicer(_LOCAL_SERVICES)),
        )
        pool = futures.ThreadPoolExecutor(settings.max_concurrent_calls, "grpcmux-proxy")
        self._server = grpc.server(pool, **_server_args(settings, self._proxy))
        self._listen_address = settings.listen_address
        self._tls = settings.tls

    def start(self):
        port = _bind(self._server, self._listen_address, self._tls)
        self._server.start()
        for name in ("", DISCOVERY_SERVICE):
            self._health.set(name, _SERVING)
        return port

    def client_gone(self, info):
        # Closing a threaded channel takes grpc locks: not on the reactor thread.
        self._reactor.callInThread(self._proxy.client_gone, info)

    def client_leaving(self, info):
        self._reactor.callInThread(self._proxy.client_leaving, info)

    def when_client_ready(self, client_id, timeout):
        def ready():
            grpc.channel_ready_future(self._proxy.channel_for(client_id)).result(timeout)

        return defer_to_thread(self._reactor, ready)

    def stop(self, grace):
        self._health.enter_graceful_shutdown()
        self._discovery.close()  # Watch streams never end by themselves
        stopped = self._server.stop(grace)  # cancels what still runs after grace

        def finish():
            stopped.wait(grace + _START_TIMEOUT)
            self._proxy.close()

        return defer_to_thread(self._reactor, finish)


def _bind(server, address, tls):
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as e:  # grpcio's only word on a failed bind
        raise OSError(f"proxy endpoint cannot listen on {address!r}") from e


def _fire(d, future):
    error = future.exception()
    if error is None:
        d.callback(None)
    else:
        d.errback(error)
