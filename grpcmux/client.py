"""The multiplexer client: dials out, introduces itself, and serves the server's streams.

Each stream the server opens is spliced to a new TCP connection to the local gRPC
server, so HTTP/2 bytes pass untouched and no grpcio runs on this side.  The
connection is kept by Twisted's ``ClientService``; the handshake is its
``prepareConnection``, so a refusal or a handshake that fails or times out is a
failed attempt like a refused connect.  Whatever ends a session (the server
restarting, a GoAway, a network fault, a refusal) leads to a new attempt after a
jittered exponential backoff, at the next of the multiplexer addresses.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from grpcmux import __version__, tls
from grpcmux.addresses import client_endpoint
from grpcmux.dialer import MultiplexerDialer
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
    reject_reason,
)
from grpcmux.http2.frames import PREFACE
from grpcmux.preface import Wrong, WrongEndpoint, judge_multiplexer_server
from grpcmux.splice import SpliceProtocol, splice
from grpcmux.yamux.errors import PingTimeout
from grpcmux.tuning import tune_transport
from grpcmux.yamux.session import YamuxSession


class _StreamEnd(SpliceProtocol):
    """A stream the server opened: connects to the gRPC server, then splices."""

    def __init__(self, grpc_server):
        self._grpc_server = grpc_server
        self._connecting = None

    def connectionMade(self):
        super().connectionMade()
        self._grpc_server.active += 1
        self._connecting = self._grpc_server.connect(SpliceProtocol())
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, server_end):
        self._connecting = None
        if self.closed:
            server_end.abort()
            return
        self._grpc_server.reachable()
        self._grpc_server.metrics.streams_spliced.inc()
        tune_transport(server_end.transport)
        splice(self, server_end)

    def _failed(self, failure):
        self._connecting = None
        if not self.closed:
            self._grpc_server.metrics.backend_connect_failures.inc()
            self._grpc_server.unreachable(failure)
            self.abort()

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        if self._connecting is not None:
            self._connecting.cancel()
        self._grpc_server.active -= 1
        self._grpc_server.stream_ended()


class _GrpcServer(Factory):
    """The gRPC server the client proxies; builds a ``_StreamEnd`` per accepted stream.

    ``endpoint`` reaches it (``address`` names it in the log).  Reachability
    changes are logged once each, not once per stream.
    """

    noisy = False

    _log = Logger()

    def __init__(self, endpoint, address, client_id, stream_ended, metrics):
        self._endpoint = endpoint
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
    """The outer yamux session of one connection attempt.

    ``address`` is the multiplexer address it was dialled at; ``admitted``
    turns true when the server welcomed it (the handshake succeeded).
    """

    def __init__(self, address, **kwargs):
        super().__init__(**kwargs)
        self.address = address
        self.admitted = False
        self.tls_problem = None  # why TLS failed, when it did
        self._first_bytes = b""  # the server's, until judged (None: judged)

    @property
    def unwrapped(self):
        """This session, also when reached through ClientService's protocol proxy."""
        return self

    def dataReceived(self, data):
        if self._first_bytes is not None:
            # An HTTP/2 or TLS answer where yamux belongs is told so (grpcmux.preface).
            data = self._first_bytes + data
            verdict = judge_multiplexer_server(data)
            if verdict is None and len(data) < len(PREFACE):
                self._first_bytes = data
                return
            self._first_bytes = None
            if isinstance(verdict, Wrong):
                self._shutdown(WrongEndpoint(verdict.message), lose_transport=True)
                return
        super().dataReceived(data)

    def connectionLost(self, reason=None):
        if not self.closed:
            self.tls_problem = tls.failure_reason(reason)
        super().connectionLost(reason)


#: Seconds the server has to welcome the client (the legacy one: to answer a ping).
HANDSHAKE_TIMEOUT = 10.0


def default_retry_policy():
    """Backoff between attempts: 0.5 s growing 1.5x to 30 s, plus up to 1 s of jitter."""
    return backoffPolicy(initialDelay=0.5, maxDelay=30.0)


class Tunnel(Factory):
    """Builds sessions for ``ClientService``; ``admit`` (its prepareConnection) runs
    the handshake on each, and the tunnel then serves the server's streams.

    ``settings`` (a :class:`grpcmux.config.ClientSettings`) says who the client is,
    where the multiplexer and the gRPC server are, and how the sessions behave; a
    client without ``client_id`` gets a random one.  ``retry_policy`` maps the
    number of failed attempts in a row to the seconds to wait (``ClientService``'s
    retryPolicy).  ``backend_health`` (a BackendHealthChecker, or None) guards the
    streams' connections and hears the handshake's welcome.
    ``add_problem_observer`` lets a caller see each problem the tunnel reports
    (the line it logs).
    """

    noisy = False

    _log = Logger()

    def __init__(self, reactor, settings, *, handshake_timeout=HANDSHAKE_TIMEOUT,
                 retry_policy=None, metrics=None, backend_health=None):
        self._reactor = reactor
        self.settings = settings
        self._token = settings.token or ""
        self.metrics = metrics or ClientMetrics()
        self.metrics.track(self)
        self._sessions_started = 0
        self.client_id = settings.client_id or random_client_id()
        self.handshake_timeout = handshake_timeout
        self.yamux_config = settings.yamux_config()
        endpoint = client_endpoint(reactor, settings.grpc_server_address)
        if backend_health is not None:  # no stream to a grpcmux proxy: a call would loop
            endpoint = backend_health.guard(endpoint)
        self.grpc_server = _GrpcServer(endpoint, settings.grpc_server_address, self.client_id,
                                       self._close_if_drained, self.metrics)
        self.backend_health = backend_health
        self.retry_policy = retry_policy or default_retry_policy()
        self.session = None  # the admitted session, while there is one
        self.stopping = False
        self._accepting = None  # the session the server opens data streams on
        self._draining = None
        self._last_problem = None
        self._problem_observers = []
        self.dialling = settings.multiplexer_address  # set by the dialer for each attempt

    def buildProtocol(self, addr):
        return _TunnelSession(
            self.dialling, is_client=True, config=self.yamux_config, clock=self._reactor,
            tune_transport=tune_transport,
        )

    # -- the handshake: ClientService's prepareConnection --------------------

    def admit(self, protocol):
        """Introduce the client on a new connection; a Deferred firing once admitted.

        It fails (a failed attempt for ClientService, which backs off) when the
        server refuses, the handshake fails or times out, or TLS fails; the
        session is closed then.  Cancelling it (the service stopping) closes it too.
        """
        session = protocol.unwrapped
        if self._sessions_started:
            self.metrics.reconnects.inc()
        self._sessions_started += 1
        result = Deferred(lambda _: session.close())
        if self.settings.wire_protocol == WIRE_LEGACY:
            # A legacy server answers nothing: the session counts as admitted once it
            # answers a ping (TLS and yamux work, the server did not hang up).
            inner = YamuxSession(is_client=False, stream_factory=self.grpc_server,
                                 config=self.yamux_config, clock=self._reactor)
            inner.when_closed().addCallback(lambda _: session.close())
            session.open_stream(LegacyClientHandshake(self.client_id, inner))
            seconds = self.handshake_timeout
            timer = self._reactor.callLater(seconds, lambda: self._refused(
                Failure(HandshakeFailed(f"no answer to a ping within {seconds:g} s")),
                session, result, timed_out=True))
            answered = session.ping()
            answered.addBoth(_cancelling(timer))
            answered.addCallbacks(
                lambda _: self._admitted(session, inner, result),
                lambda failure: self._refused(
                    Failure(HandshakeFailed(
                        f"no answer to a ping within {seconds:g} s"
                        if failure.check(PingTimeout) else "the server closed the session")),
                    session, result))
            return result
        session.stream_factory = self.grpc_server
        hello = ClientHello(
            client_id=self.client_id,
            wire_protocol=WIRE_NATIVE,
            labels=self.settings.labels,
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
            lambda welcome: self._admitted(session, session, result),
            lambda failure: self._refused(failure, session, result, timed_out=timer.called))
        return result

    def _admitted(self, session, accepting, result):
        if result.called:  # cancelled: the service is stopping
            return
        session.admitted = True
        self.session = session
        self._accepting = accepting
        self._last_problem = None
        self.metrics.handshake(ACCEPTED)
        session.when_closed().addCallback(self._session_ended, session)
        session.when_go_away().addCallback(self._server_going_away, session)
        self._log.info(
            "client {client_id} connected to multiplexer {address} ({wire_protocol})",
            client_id=self.client_id,
            address=session.address,
            wire_protocol=self.settings.wire_protocol,
        )
        result.callback(session)

    def _refused(self, failure, session, result, timed_out=False):
        if result.called:  # cancelled (the service is stopping), or timed out already
            return
        failure.trap(HandshakeRejected, HandshakeFailed)
        stopping = self.stopping  # then the stop itself closed the session: not counted
        if stopping:
            pass
        elif failure.check(HandshakeRejected):
            self.metrics.handshake(REJECTED, reject_reason(failure.value.code))
        else:
            self.metrics.handshake(TIMED_OUT if timed_out else FAILED)
        # ClientService counts a failed attempt and backs off.  First: what follows
        # (observers of the report, the close) may end the handshake once more.
        result.errback(failure)
        if not stopping:
            if session.tls_problem is not None:
                self._tls_failed(session.address, session.tls_problem)
            else:
                self._report(f"multiplexer {session.address} refused client "
                             f"{self.client_id}: {failure.value}")
        session.close()

    def _tls_failed(self, address, problem):
        hint = ""
        if "certificate verify failed" in problem:
            hint = " (is the server's certificate signed by the CA of --tls-ca?)"
        self._report(f"TLS with multiplexer {address} failed: {problem}{hint}; retrying")

    # -- an admitted session -------------------------------------------------

    def _server_going_away(self, _, session):
        """The server takes no new streams: leave once the calls in flight are done."""
        self._log.info(
            "multiplexer {address} is going away; client {client_id} reconnects once "
            "its {active} stream(s) in flight are done",
            address=session.address,
            client_id=self.client_id,
            active=self.grpc_server.active,
        )
        self._draining = session
        self._close_if_drained()

    def drain(self, grace):
        """Take no new streams; close the session once its streams are done.

        For a graceful stop: fires once the session has closed, at the latest
        after ``grace`` seconds, when whatever still runs is cut.
        """
        self.stopping = True
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
        if self._draining is not None and self.grpc_server.active == 0:
            session, self._draining = self._draining, None
            session.close()

    def _session_ended(self, reason, session):
        if self._draining is session:
            self._draining = None
        if self.session is not session:
            return
        self.session = None
        if self.stopping:
            return
        if session.tls_problem is not None:
            self._tls_failed(session.address, session.tls_problem)  # legacy: TLS broke later
        else:
            self._report(
                f"client {self.client_id} lost its session with multiplexer "
                f"{session.address} ({reason or 'closed'}); reconnecting"
            )

    # -- problems ------------------------------------------------------------

    def connect_failed(self, problem):
        """No multiplexer address could be dialled in this attempt (``problem`` says why)."""
        if not self.stopping:
            self._report(f"client {self.client_id} cannot connect to multiplexer "
                         f"{problem}; retrying")

    def add_problem_observer(self, observer):
        """Call ``observer(line)`` with each problem reported; returns a remover."""
        self._problem_observers.append(observer)
        return lambda: self._problem_observers.remove(observer)

    def _report(self, problem):
        """Log a reason for reconnecting once, not at every retry."""
        for observer in list(self._problem_observers):
            observer(problem)
        if problem != self._last_problem:
            self._last_problem = problem
            self._log.warn("{problem}", problem=problem)


def _cancelling(timer):
    def cancel(result):
        if timer.active():
            timer.cancel()
        return result

    return cancel


def _readable(policy):
    """``policy`` with its delays rounded: ClientService logs them as they are."""
    return lambda attempt: round(policy(attempt), 2)


class TunnelClientService(MultiService):
    """The client for twistd: a ``ClientService`` keeping one tunnel up.

    Stopping drains first: the server may open no new streams, and those in
    flight get up to the settings' ``shutdown_grace`` seconds to finish; the
    connector stops before the session's end reaches it, so nothing is reported
    or retried.  ``tls_creator_for(address)`` gives the TLS options for dialling
    a multiplexer address (default: the settings', with ``tls`` on; else
    plaintext); ``resolver`` and ``rng`` go to the :class:`MultiplexerDialer`.
    """

    def __init__(self, reactor, tunnel, tls_creator_for=None, resolver=None, rng=None):
        super().__init__()
        self.tunnel = tunnel
        settings = tunnel.settings
        self.shutdown_grace = settings.shutdown_grace
        self._reactor = reactor
        if tls_creator_for is None and settings.tls:
            tls_creator_for = settings.tls_creator_for
        self.dialer = MultiplexerDialer(reactor, tunnel, tls_creator_for, resolver, rng)
        self.connector = ClientService(
            self.dialer,
            tunnel,
            retryPolicy=_readable(tunnel.retry_policy),
            clock=reactor,
            prepareConnection=tunnel.admit,
        )
        self.connector.setServiceParent(self)

    def when_connected(self, fail_after_failures=None):
        """A Deferred firing with the admitted session (the current or the next one).

        It fires in a later reactor turn than ClientService's ``whenConnected``,
        which fires from inside its state machine: stopping the service from
        there would re-enter the machine, which automat refuses.
        """
        connected = self.connector.whenConnected(failAfterFailures=fail_after_failures)
        return connected.addCallback(lambda session: deferLater(self._reactor, 0, lambda: session))

    def startService(self):
        self.tunnel.stopping = False
        super().startService()

    def stopService(self):
        drained = self.tunnel.drain(self.shutdown_grace)
        drained.addCallback(lambda _: MultiService.stopService(self))
        return drained
