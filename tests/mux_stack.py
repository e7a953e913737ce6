"""A whole grpcmux on loopback, in this process: server, proxy, clients, a backend.

Everything runs on the real reactor; blocking grpc client code runs in threads.
Every wait has a timeout, so a broken tunnel fails a test instead of hanging it.
"""

import dataclasses
import io

import grpc
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings, ServerSettings
from grpcmux.registry import ClientRegistry
from grpcmux.proxy import ProxyService
from grpcmux.server import MultiplexerServer
from rpc_backend import UNLIMITED, Backend, in_thread, invoke

TIMEOUT = 20.0


class Stack:
    """Server + proxy on 127.0.0.1 ports chosen by the system, and a backend.

    ``settings`` are ServerSettings fields for both endpoints (``max_clients=``,
    ``tls_cert=``, ``auth_tokens=``, ...); ``proxy_kwargs`` go to the ProxyService
    (``tls=``, ``tokens=``, ``observer=``, ...), ``metrics`` to the MultiplexerServer.
    """

    def __init__(self, reactor, tmp_path, proxy_kwargs=None, settings=None, metrics=None):
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.registry = ClientRegistry()
        self.backend = Backend(str(tmp_path / "backend.sock"), tcp=True)
        self.backend_address = f"unix:{self.backend.socket_path}"
        self.settings = ServerSettings(**{
            "multiplexer_listener": "tcp:0:interface=127.0.0.1",
            "proxy_listener": "127.0.0.1:0",
            "runtime_dir": str(tmp_path / "run"),
            "shutdown_grace": 1.0,
            **(settings or {}),
        })
        self._metrics = metrics
        self.server = self._start_server(self.settings)
        self.multiplexer_address = f"127.0.0.1:{self.server.port.getHost().port}"
        self.proxy = ProxyService(reactor, self.registry, self.settings,
                                  tunnels=lambda client_id: self.server.tunnel_for(client_id),
                                  **(proxy_kwargs or {}))
        self.proxy.startService()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.proxy.port}", options=UNLIMITED)
        self.clients = []

    def _start_server(self, settings):
        server = MultiplexerServer(self.reactor, self.registry, settings, metrics=self._metrics)
        server.startService()
        return server

    def restart_server(self):
        """Stop the multiplexer server and start a new one on the same port."""
        d = self.server.stopService()

        def start_again(_):
            host, port = self.multiplexer_address.split(":")
            self.server = self._start_server(dataclasses.replace(
                self.settings, multiplexer_listener=f"tcp:{port}:interface={host}"))

        return d.addCallback(start_again).addTimeout(TIMEOUT, self.reactor)

    def client(self, client_id, wire_protocol="native", backend_address=None, labels=(),
               token=None, tls_creator=None, foreign_id=None):
        """Start a client; ``.when_connected()`` tells when it is in.

        ``token`` and ``tls_creator`` (``grpcmux.tls.client_creator``) are the
        client's credentials; the server's are ``Stack(settings={"tls_cert": ...})``.
        ``foreign_id`` is an id to introduce the client with that its settings
        would refuse, as a client other than grpcmux's might send.
        """
        settings = ClientSettings(
            client_id=client_id,
            grpc_server_address=backend_address or self.backend_address,
            multiplexer_address=self.multiplexer_address,
            wire_protocol=wire_protocol,
            labels=labels,
            token=token,
        )
        tunnel = Tunnel(self.reactor, settings, retry_policy=RecordingPolicy())
        if foreign_id is not None:
            tunnel.client_id = foreign_id
        service = TunnelClientService(
            self.reactor, tunnel,
            tls_creator_for=None if tls_creator is None else lambda address: tls_creator)
        service.startService()
        self.clients.append(service)
        return service

    def admitted(self, service):
        return service.when_connected().addTimeout(TIMEOUT, self.reactor)

    def registered(self, client_id):
        """A Deferred firing once the server lists ``client_id`` in its registry."""
        result = Deferred()
        if client_id in self.registry.snapshot:
            result.callback(None)
            return result

        def observe(event):
            if event.info.client_id == client_id and client_id in self.registry.snapshot:
                unsubscribe()
                result.callback(None)

        unsubscribe = self.registry.subscribe(observe)
        return result.addTimeout(TIMEOUT, self.reactor)

    def registry_event(self, client_id):
        """A Deferred firing with the next registry event about ``client_id``."""
        result = Deferred()

        def observe(event):
            if event.info.client_id == client_id:
                unsubscribe()
                result.callback(event)

        unsubscribe = self.registry.subscribe(observe)
        return result.addTimeout(TIMEOUT, self.reactor)

    async def connected_client(self, client_id, **kwargs):
        """Start a client and wait until the server has registered it."""
        registered = self.registered(client_id)
        service = self.client(client_id, **kwargs)
        await self.admitted(service)
        await registered
        return service

    def in_thread(self, fn, *args, **kwargs):
        return in_thread(self.reactor, fn, *args, wait=TIMEOUT + 10, **kwargs)

    def proxy_channel_ready(self, client_id):
        """Wait until the proxy's channel to ``client_id`` is connected again.

        After a failure grpc reconnects by itself after a short backoff; calls made
        in between fail fast, as they should, so a test waits for this first.
        """
        return self.proxy.when_client_ready(client_id).addTimeout(
            TIMEOUT + 5, self.reactor
        )

    def invoke(self, kind, request, metadata=(), timeout=TIMEOUT, **kwargs):
        return self.in_thread(invoke, self.channel, kind, request, metadata, timeout, **kwargs)

    async def stop(self):
        """Stop everything; the proxy first, so the clients have nothing to drain."""
        self.channel.close()
        if self.proxy.running:
            await self.proxy.stopService().addTimeout(TIMEOUT, self.reactor)
        stopping = [service.stopService() for service in self.clients if service.running]
        await DeferredList(stopping).addTimeout(TIMEOUT, self.reactor)
        if self.server.running:
            await self.server.stopService().addTimeout(TIMEOUT, self.reactor)
        await self.in_thread(self.backend.stop)
        # One more reactor turn: work scheduled for the next turn by the last closes
        # (a session's flush, a splice's cleanup) runs now, so the leftover-call check
        # sees only real timers.
        await deferLater(self.reactor, 0, lambda: None)


class RecordingPolicy:
    """A quick backoff that remembers the failed-attempt counts it was asked about."""

    def __init__(self):
        self.attempts = []
        self._policy = backoffPolicy(initialDelay=0.05, maxDelay=0.5)

    def __call__(self, attempt):
        self.attempts.append(attempt)
        return self._policy(attempt)


def first_report(service, reactor=None):
    """A Deferred firing with the first problem a client service reports."""
    from twisted.internet import reactor as default

    reported = Deferred()

    def observe(problem):
        if not reported.called:
            remove()
            reported.callback(problem)

    remove = service.tunnel.add_problem_observer(observe)
    return reported.addTimeout(TIMEOUT, reactor or default)


def run_cli(reactor, *argv):
    """``grpcmux <argv>`` in a thread: a Deferred of (status, stdout, stderr)."""
    from grpcmux import cli

    def run():
        out, err = io.StringIO(), io.StringIO()
        return cli.run(list(argv), out, err), out.getvalue(), err.getvalue()

    return deferToThread(run).addTimeout(TIMEOUT, reactor)
