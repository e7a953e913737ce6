"""The multiplexer client: dials out, introduces itself, and serves the server's streams.

Each stream the server opens is spliced to a new TCP connection to the local gRPC
server, so HTTP/2 bytes pass untouched and no grpcio runs on this side.  The
connection is kept by Twisted's ``ClientService``: whatever ends a session (the
server restarting, a GoAway, a network fault, a refusal) leads to a new attempt
after a jittered exponential backoff.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from grpcmux import __version__, tls
from grpcmux.addresses import client_endpoint
from grpcmux.backend_health import BackendHealthChecker
from grpcmux.handshake import (
    WIRE_LEGACY,
    WIRE_NATIVE,
    ClientHello,
    HandshakeFailed,
    HandshakeRejected,
    LegacyClientHandshake,
    NativeClientHandshake,
)
from grpcmux.ids import random_client_id
from grpcmux.metrics import (
    ACCEPTED,
    FAILED,
    REJECTED,
    TIMED_OUT,
    ClientMetrics,
    MetricsService,
    reject_reason,
)
from grpcmux.preface import PrefaceGuard, judge_multiplexer_server
from grpcmux.splice import SpliceProtocol, splice
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.session import YamuxSession, tune_transport


class _StreamEnd(SpliceProtocol):
    """A stream the server opened: connects to the gRPC server, then splices."""

    def __init__(self, backend):
        self._backend = backend
        self._connecting = None

    def connectionMade(self):
        super().connectionMade()
        self._backend.active += 1
        self._connecting = self._backend.connect(SpliceProtocol())
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, backend_end):
        self._connecting = None
        if self._closed:
            backend_end.abort()
            return
        self._backend.reachable()
        self._backend.metrics.streams_spliced.inc()
        tune_transport(backend_end.transport)
        splice(self, backend_end)

    def _failed(self, failure):
        self._connecting = None
        if not self._closed:
            self._backend.metrics.backend_connect_failures.inc()
            self._backend.unreachable(failure)
            self.abort()

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        if self._connecting is not None:
            self._connecting.cancel()
        self._backend.active -= 1
        self._backend.stream_ended()


class _Backend(Factory):
    """The local gRPC server; builds a ``_StreamEnd`` per accepted stream.

    Reachability changes are logged once each, not once per stream.
    """

    noisy = False

    _log = Logger()

    def __init__(self, reactor, address, client_id, stream_ended, metrics):
        self._endpoint = client_endpoint(reactor, address)
        self.metrics = metrics
        self.address = address
        self._client_id = client_id
        self._down = False
        self.active = 0
        self.stream_ended = stream_ended

    def buildProtocol(self, addr):
        return _StreamEnd(self)

    def connect(self, protocol):
        return connectProtocol(self._endpoint, protocol)

    def reachable(self):
        if self._down:
            self._down = False
            self._log.info("gRPC server {address} is reachable again", address=self.address)

    def unreachable(self, failure):
        if not self._down:
            self._down = True
            self._log.warn(
                "client {client_id} cannot reach its gRPC server {address}: {error}",
                client_id=self._client_id,
                address=self.address,
                error=failure.getErrorMessage(),
            )


class _TunnelSession(YamuxSession):
    """The outer yamux session; tells the tunnel when it is up so it can introduce itself."""

    def __init__(self, tunnel, **kwargs):
        super().__init__(**kwargs)
        self._tunnel = tunnel
        self.tls_problem = None  # why TLS failed, when it did

    def connectionMade(self):
        super().connectionMade()
        self._tunnel.session_started(self)

    def connectionLost(self, reason=None):
        self.tls_problem = tls.failure_reason(reason)
        super().connectionLost(reason)


class _RetryPolicy:
    """Backoff over failed attempts, counting sessions that ended before admission.

    ``ClientService`` counts only failed TCP connects and resets after any
    connection, so a server that keeps refusing would be dialled in a tight loop;
    a session that ends without a Welcome counts as a failure here.
    """

    def __init__(self, policy=None):
        self._policy = policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self.unadmitted = 0

    def __call__(self, attempt):
        return self._policy(attempt + self.unadmitted)


class Tunnel(Factory):
    """Builds sessions for ``ClientService`` and runs the handshake on each."""

    noisy = False

    _log = Logger()

    def __init__(
        self,
        reactor,
        client_id,
        grpc_server_address,
        multiplexer_address,
        wire_protocol=WIRE_NATIVE,
        labels=(),
        handshake_timeout=10.0,
        yamux_config=None,
        retry_policy=None,
        metrics=None,
        token=None,
        backend_health=None,
    ):
        self._reactor = reactor
        self._token = token or ""
        self.metrics = metrics or ClientMetrics()
        self.metrics.track(self)
        self._sessions_started = 0
        self.client_id = client_id
        self.multiplexer_address = multiplexer_address
        self.wire_protocol = wire_protocol
        self.labels = tuple(labels)
        self.handshake_timeout = handshake_timeout
        self.yamux_config = yamux_config or YamuxConfig()
        self.backend = _Backend(
            reactor, grpc_server_address, client_id, self._close_if_drained, self.metrics
        )
        self.backend_health = backend_health  # a BackendHealthChecker, or None
        if backend_health is not None:  # no stream to a grpcmux proxy: a call would loop
            self.backend._endpoint = backend_health.guard(self.backend._endpoint)
        self.retry_policy = retry_policy or _RetryPolicy()
        self.session = None
        self._accepting = None  # the session the server opens data streams on
        self._draining = None
        self._waiters = []
        self._last_problem = None

    def buildProtocol(self, addr):
        return PrefaceGuard(_TunnelSession(
            self, is_client=True, config=self.yamux_config, clock=self._reactor
        ), judge_multiplexer_server)  # an HTTP/2 or TLS answer: told so (grpcmux.preface)

    def when_admitted(self):
        """A Deferred firing with the next session the server admits."""
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    def session_started(self, session):
        if self._sessions_started:
            self.metrics.reconnects.inc()
        self._sessions_started += 1
        session.when_closed().addCallback(self._session_ended, session)
        session.when_go_away().addCallback(self._server_going_away, session)
        if self.wire_protocol == WIRE_LEGACY:
            inner = YamuxSession(
                is_client=False,
                stream_factory=self.backend,
                config=self.yamux_config,
                clock=self._reactor,
            )
            inner.when_closed().addCallback(lambda _: session.close())
            self._accepting = inner
            session.open_stream(LegacyClientHandshake(self.client_id, inner))
            self._admitted(session)
            return
        session.stream_factory = self.backend
        self._accepting = session
        hello = ClientHello(
            client_id=self.client_id,
            wire_protocol=WIRE_NATIVE,
            labels=self.labels,
            version=__version__,
            token=self._token,
        )
        control = NativeClientHandshake(hello)
        session.open_stream(control)
        timer = self._reactor.callLater(
            self.handshake_timeout, control.timed_out, self.handshake_timeout
        )
        control.result.addBoth(_cancelling(timer))
        if self.backend_health is not None:
            control.result.addCallback(self.backend_health.welcomed, control)
        control.result.addCallbacks(
            lambda welcome: self._admitted(session), self._refused, errbackArgs=(session, timer)
        )

    def _admitted(self, session):
        self.session = session
        self.retry_policy.unadmitted = 0
        self._last_problem = None
        self.metrics.handshake(ACCEPTED)
        self._log.info(
            "client {client_id} connected to multiplexer {address} ({wire_protocol})",
            client_id=self.client_id,
            address=self.multiplexer_address,
            wire_protocol=self.wire_protocol,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(session)

    def _refused(self, failure, session, timer):
        failure.trap(HandshakeRejected, HandshakeFailed)
        if failure.check(HandshakeRejected):
            self.metrics.handshake(REJECTED, reject_reason(failure.value.code))
        else:
            self.metrics.handshake(TIMED_OUT if timer.called else FAILED)
        self.retry_policy.unadmitted += 1
        if session.tls_problem is not None:
            self._tls_failed(session.tls_problem)
        else:
            self._report(f"multiplexer {self.multiplexer_address} refused client "
                         f"{self.client_id}: {failure.value}")
        session.close()

    def _tls_failed(self, problem):
        hint = ""
        if "certificate verify failed" in problem:
            hint = " (is the server's certificate signed by the CA of --tls-ca?)"
        self._report(f"TLS with multiplexer {self.multiplexer_address} failed: "
                     f"{problem}{hint}; retrying")

    def _server_going_away(self, _, session):
        """The server takes no new streams: leave once the calls in flight are done."""
        self._log.info(
            "multiplexer {address} is going away; client {client_id} reconnects once "
            "its {active} stream(s) in flight are done",
            address=self.multiplexer_address,
            client_id=self.client_id,
            active=self.backend.active,
        )
        self._draining = session
        self._close_if_drained()

    def drain(self, grace):
        """Take no new streams; close the session once its streams are done.

        For a graceful stop: fires once the session has closed, at the latest
        after ``grace`` seconds, when whatever still runs is cut.
        """
        session = self.session
        if session is None or session.closed:
            return succeed(None)
        self._accepting.go_away()
        self._draining = session
        closed = session.when_closed()
        closed.addBoth(_cancelling(self._reactor.callLater(grace, session.close)))
        self._close_if_drained()
        return closed

    def _close_if_drained(self):
        if self._draining is not None and self.backend.active == 0:
            session, self._draining = self._draining, None
            session.close()

    def _session_ended(self, reason, session):
        if self._draining is session:
            self._draining = None
        if self.session is session and session.tls_problem is not None:
            self.session = None  # a legacy session: admitted before TLS was through
            self.retry_policy.unadmitted += 1
            self._tls_failed(session.tls_problem)
        elif self.session is session:
            self.session = None
            self._report(
                f"client {self.client_id} lost its session with multiplexer "
                f"{self.multiplexer_address} ({reason or 'closed'}); reconnecting"
            )

    def connect_failed(self, failure):
        self._report(
            f"client {self.client_id} cannot connect to multiplexer "
            f"{self.multiplexer_address}: {failure.getErrorMessage()}; retrying"
        )

    def _report(self, problem):
        """Log a reason for reconnecting once, not at every retry."""
        if problem != self._last_problem:
            self._last_problem = problem
            self._log.warn("{problem}", problem=problem)


def _cancelling(timer):
    def cancel(result):
        if timer.active():
            timer.cancel()
        return result

    return cancel


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps the multiplexer's endpoint to log why a connection attempt failed."""

    def __init__(self, endpoint, tunnel):
        self._endpoint = endpoint
        self._tunnel = tunnel

    def connect(self, factory):
        return self._endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure):
        if not failure.check(CancelledError, ConnectingCancelledError):
            self._tunnel.connect_failed(failure)
        return failure


class TunnelClientService(MultiService):
    """The client for twistd: a ``ClientService`` keeping one tunnel up.

    Stopping drains first: the server may open no new streams, and those in
    flight get up to ``shutdown_grace`` seconds to finish.
    """

    def __init__(self, reactor, tunnel, shutdown_grace=10.0, tls_creator=None):
        super().__init__()
        self.tunnel = tunnel
        self.shutdown_grace = shutdown_grace
        self._reactor = reactor
        endpoint = client_endpoint(reactor, tunnel.multiplexer_address)
        if tls_creator is not None:
            endpoint = wrapClientTLS(tls_creator, endpoint)
        self.connector = ClientService(
            _ReportingEndpoint(endpoint, tunnel),
            tunnel,
            retryPolicy=tunnel.retry_policy,
            clock=reactor,
        )
        self.connector.setServiceParent(self)

    def stopService(self):
        drained = self.tunnel.drain(self.shutdown_grace)
        # The session may end inside ClientService's own bookkeeping of that very
        # disconnect; stopping it from there would re-enter its state machine.
        drained.addCallback(lambda _: deferLater(self._reactor, 0, MultiService.stopService, self))
        return drained


def make_service(settings, reactor):
    client_id = settings.client_id
    if not client_id:
        client_id = random_client_id()
        Tunnel._log.info("no --client-id given; using {client_id}", client_id=client_id)
    backend_health = BackendHealthChecker(
        reactor, client_endpoint(reactor, settings.grpc_server_address),
        settings.grpc_server_address)
    tunnel = Tunnel(
        reactor,
        client_id,
        settings.grpc_server_address,
        settings.multiplexer_address,
        wire_protocol=settings.wire_protocol,
        labels=settings.labels,
        token=settings.token,
        yamux_config=YamuxConfig(
            keepalive_interval=settings.keepalive_interval,
            connection_write_timeout=settings.keepalive_timeout,
            max_stream_window_size=settings.stream_window,
        ),
        backend_health=backend_health,
    )
    if settings.token and not settings.tls:
        Tunnel._log.warn("a token without --tls crosses the network in clear")
    service = TunnelClientService(
        reactor, tunnel, shutdown_grace=settings.shutdown_grace,
        tls_creator=settings.tls_creator,
    )
    backend_health.setServiceParent(service)
    if settings.metrics_listener:
        metrics = MetricsService(reactor, settings.metrics_listener, tunnel.metrics.registry)
        metrics.setName("metrics")
        metrics.setServiceParent(service)
    return service
