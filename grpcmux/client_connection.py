"""One multiplexer client's connection at the server, from accept to departure.

The states a connection goes through:

1. handshaking: the client's first stream carries its hello (native or legacy);
   it must come within ``handshake_timeout`` seconds of the accept, or the session
   is aborted.  A second stream breaks the protocol: GoAway(protocol error).
2. deciding: the server's :class:`~grpcmux.client_table.ClientTable` decides on
   the hello (which may ping the current holder of the id); a refused client is
   told why (native) or dropped (legacy).
3. admitted: listed in the registry, with a :class:`TunnelTarget` the proxy's router
   opens streams through.
4. leaving: the client sent GoAway; nothing new is routed to it, its calls in
   flight get up to ``shutdown_grace`` seconds, then the session is closed.
5. departed: the session ended; the connection is forgotten once, and the
   transport of a politely closed session lingers until the peer has read it.
"""

from twisted.internet.task import LoopingCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from grpcmux import __version__, tls
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.backend_health import ReportedHealth
from grpcmux.handshake import WIRE_NATIVE, HandshakeRejected, ServerHandshake
from grpcmux.http2.targets import TunnelTarget
from grpcmux.metrics import ACCEPTED, FAILED, REJECTED, TIMED_OUT, reject_reason
from grpcmux.yamux.frame import GO_AWAY_PROTOCOL_ERROR
from grpcmux.yamux.session import YamuxSession

#: Seconds between checks whether a client that sent GoAway has calls left.
DRAIN_CHECK_INTERVAL = 0.5


class FirstStreamOnly(Factory):
    """Hands the client's first stream to the handshake.

    A client opens exactly one stream (the control stream, or the legacy id line's);
    another one breaks the protocol: the session is closed with GoAway(protocol
    error), so a flood of SYNs costs one stream, not thousands.
    """

    _log = Logger()
    noisy = False

    def __init__(self, connection):
        self._connection = connection
        self._used = False

    def buildProtocol(self, addr):
        if self._used:
            connection = self._connection
            self._log.warn(
                "client {client_id!r} from {remote_address} opened a second stream; "
                "closing its session",
                client_id=connection.client_id,
                remote_address=connection.remote_address,
            )
            connection.session.close(GO_AWAY_PROTOCOL_ERROR)
            return None
        self._used = True
        return self._connection.handshake


class ClientConnection:
    """One multiplexer client's connection, from accept to departure.

    ``server`` is the :class:`~grpcmux.server.MultiplexerServer` that accepted
    ``session``; the connection asks it to admit, register, retire and forget it.
    """

    _log = Logger()

    def __init__(self, server, session, remote_address):
        self._server = server
        self._reactor = server.reactor
        self._settings = server.settings
        self.session = session
        self.remote_address = remote_address
        self.hello = None
        self.tunnel = None
        self.inner_session = None
        self.admitted = False
        self._departed = False
        self._draining = None  # LoopingCall once the client sent GoAway
        self.health_reports = ReportedHealth(
            self._reactor, lambda health, detail: server.health_reported(self, health, detail))
        self.handshake = ServerHandshake(
            self._hello_received, self._handshake_failed, self._make_inner_session,
            on_message=self.health_reports.received,
        )
        session.stream_factory = FirstStreamOnly(self)
        self._timeout = self._reactor.callLater(
            self._settings.handshake_timeout, self._handshake_timed_out)
        session.when_closed().addCallback(self._session_closed)

    @property
    def client_id(self):
        return self.hello.client_id if self.hello else None

    def _make_inner_session(self):
        inner = YamuxSession(is_client=True, config=self._server.yamux_config,
                             clock=self._reactor)
        inner.when_closed().addCallback(lambda _: self.session.close())
        self.inner_session = inner
        return inner

    def open_streams(self):
        """Streams open on this client's session(s), the legacy inner one included."""
        inner = self.inner_session
        return len(self.session.streams) + (len(inner.streams) if inner is not None else 0)

    def calls_in_flight(self):
        """Open streams other than the handshake's: what the client still carries."""
        control = self.handshake.transport
        return sum(
            stream is not control
            for session in (self.session, self.inner_session) if session is not None
            for stream in session.streams.values()
        )

    def _hello_received(self, handshake, hello):
        self.hello = hello
        self._server.admit(self).addCallbacks(self._admitted, self._refused)

    def _admitted(self, _):
        if self.session.closed:
            self._server.forget(self)
            return
        self._cancel_timeout()
        welcome = tunnel_pb2.Welcome(
            server_version=__version__,
            keepalive_interval_ms=int(self.session.config.keepalive_interval * 1000),
        )
        if self.handshake.wire_protocol == WIRE_NATIVE:
            stream_session = self.session
            self.handshake.accept(welcome)
        else:
            # A legacy client is told nothing; its streams run on the inner session.
            stream_session = self.handshake.accept(welcome)
        self.tunnel = TunnelTarget(self.client_id, stream_session)
        self.admitted = True
        self._server.register(self)
        stream_session.when_go_away().addCallback(self._leaving)
        self._server.metrics.handshake(ACCEPTED)

    def _leaving(self, _):
        """The client sent GoAway (it is stopping): route nothing new to it.

        Its calls in flight go on for up to the shutdown grace; the session is
        closed once they are done (or then), whatever the client does, and counts
        against the client limit until it is.
        """
        self._log.info(
            "client {client_id} is leaving; its calls in flight may finish",
            client_id=self.client_id,
            remote_address=self.remote_address,
        )
        self._server.retire(self)
        grace = self._settings.shutdown_grace
        self._draining = LoopingCall(self._close_when_drained, self._reactor.seconds() + grace)
        self._draining.clock = self._reactor
        self._draining.start(min(DRAIN_CHECK_INTERVAL, grace))

    def _close_when_drained(self, deadline):
        calls = self.calls_in_flight()
        if calls == 0:
            self._log.info(
                "client {client_id} has no calls left; closing its session",
                client_id=self.client_id,
                remote_address=self.remote_address,
            )
            self.session.close()
        elif self._reactor.seconds() >= deadline:
            self._log.warn(
                "client {client_id} from {remote_address} still carries {calls} calls "
                "{seconds:g} s after its GoAway; closing its session",
                client_id=self.client_id,
                remote_address=self.remote_address,
                calls=calls,
                seconds=self._settings.shutdown_grace,
            )
            self.session.abort()

    def _refused(self, failure):
        failure.trap(HandshakeRejected)
        rejected = failure.value
        self._log.warn(
            "refused client {client_id!r} from {remote_address}: {reason}",
            client_id=self.hello.client_id,
            remote_address=self.remote_address,
            reason=rejected,
        )
        self._cancel_timeout()
        self._reject(rejected)

    def _reject(self, rejected):
        """Send (native) or act out (legacy: drop) ``rejected``, then close the session."""
        self._server.metrics.handshake(REJECTED, reject_reason(rejected.code))
        reactor = self._reactor
        self.handshake.reject(
            rejected.code, rejected.message, lambda: reactor.callLater(0, self.session.close)
        )

    def _handshake_failed(self, handshake, reason):
        self._log.warn(
            "handshake with {remote_address} failed: {reason}",
            remote_address=self.remote_address,
            reason=reason,
        )
        if self._timeout is not None:  # else the timeout already counted it
            self._server.metrics.handshake(FAILED)
        self._cancel_timeout()
        self.session.abort()

    def _handshake_timed_out(self):
        self._timeout = None
        self._server.metrics.handshake(TIMED_OUT)
        self._log.warn(
            "no handshake from {remote_address} within {seconds:g} s; closing",
            remote_address=self.remote_address,
            seconds=self._settings.handshake_timeout,
        )
        self.session.abort()

    def _cancel_timeout(self):
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _session_closed(self, reason):
        self._cancel_timeout()
        if self._draining is not None and self._draining.running:
            self._draining.stop()
        transport = self.session.transport
        if transport is not None and transport.connected:
            # A polite close waits until the peer has read what is buffered; one
            # that never reads would keep the connection (and its descriptor).
            lingering = self._server.lingering
            lingering.linger(transport, self.remote_address,
                             self.session.config.connection_write_timeout)
            self.session.on_transport_lost = lambda: lingering.gone(transport)
        self.health_reports.stop()
        problem = tls.failure_reason(reason) if self.hello is None else None
        if problem is not None:
            self._log.warn(
                "TLS with {remote_address} failed: {reason}",
                remote_address=self.remote_address,
                reason=problem,
            )
        self.depart(reason)

    def depart(self, reason=None):
        """Remove this client from the registry, once."""
        if self._departed:
            return
        self._departed = True
        self._server.forget(self)
        self._server.metrics.session_closed(self.session)
        if self.admitted:
            self._log.info(
                "client {client_id} disconnected ({reason})",
                client_id=self.client_id,
                remote_address=self.remote_address,
                reason=reason_text(reason),
            )


def reason_text(reason):
    """Why a session ended, as a log line's parenthesis: "connection was closed
    cleanly", not Twisted's "Connection was closed cleanly."."""
    text = str(getattr(reason, "value", reason) or "closed").strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text
