"""The multiplexer server: accepts clients, admits them, and lists them for the proxy.

Per accepted connection (``_ClientConnection``): a yamux server session; the
client's first stream carries the handshake (native or legacy, told apart by its
first byte); once admitted, the client gets an entry in the ``ClientRegistry`` that
the proxy and Discovery read, and an upstream target (``tunnel_for``) through which
the proxy's router opens streams to it.  The connection is forgotten the moment its
session ends.
"""

import resource
import time

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from grpcmux import __version__, tls
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.addresses import describe_address
from grpcmux.admission import Admission
from grpcmux.backend_health import ReportedHealth, record_health
from grpcmux.handshake import WIRE_NATIVE, HandshakeRejected, ServerHandshake
from grpcmux.http2.targets import TunnelTarget
from grpcmux.ids import client_id_problem
from grpcmux.listening import listen
from grpcmux.metrics import (
    ACCEPTED,
    FAILED,
    REJECTED,
    TIMED_OUT,
    MetricsService,
    ServerMetrics,
    reject_reason,
)
from grpcmux.preface import PrefaceGuard, judge_multiplexer_client
from grpcmux.registry import ClientInfo, ClientRegistry
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.frame import GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR
from grpcmux.tuning import tune_transport
from grpcmux.yamux.session import YamuxSession

Reject = tunnel_pb2.Reject
# Seconds between checks whether a client that sent GoAway has calls left.
DRAIN_CHECK_INTERVAL = 0.5
# Seconds between two log lines saying that the handshake limit holds connections back.
HANDSHAKE_LIMIT_LOG_INTERVAL = 60.0


class _FirstStreamOnly(Factory):
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


class _ClientConnection:
    """One multiplexer client's connection, from accept to departure."""

    _log = Logger()

    def __init__(self, server, session, remote_address):
        self._server = server
        self.session = session
        self.remote_address = remote_address
        self.hello = None
        self.tunnel = None
        self.inner_session = None
        self.admitted = False
        self.cluster_claimed = False  # claimed in the cluster registry, not yet admitted
        self.handshaking = True  # counted against max_handshakes
        self._departed = False
        self._draining = None  # LoopingCall once the client sent GoAway
        self.health_reports = ReportedHealth(
            server.clock, lambda health, detail: server.health_reported(self, health, detail))
        self.handshake = ServerHandshake(
            self._hello_received, self._handshake_failed, self._make_inner_session,
            on_message=self.health_reports.received,
        )
        session.stream_factory = _FirstStreamOnly(self)
        self._timeout = server.clock.callLater(
            server.handshake_timeout, self._handshake_timed_out
        )
        session.when_closed().addCallback(self._session_closed)

    @property
    def client_id(self):
        return self.hello.client_id if self.hello else None

    def _make_inner_session(self):
        inner = YamuxSession(is_client=True, config=self._server.yamux_config, clock=self._server.clock)
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
        clock = self._server.clock
        self._draining = LoopingCall(self._close_when_drained,
                                     clock.seconds() + self._server.shutdown_grace)
        self._draining.clock = clock
        self._draining.start(min(DRAIN_CHECK_INTERVAL, self._server.shutdown_grace))

    def _close_when_drained(self, deadline):
        calls = self.calls_in_flight()
        if calls == 0:
            self._log.info(
                "client {client_id} has no calls left; closing its session",
                client_id=self.client_id,
                remote_address=self.remote_address,
            )
            self.session.close()
        elif self._server.clock.seconds() >= deadline:
            self._log.warn(
                "client {client_id} from {remote_address} still carries {calls} calls "
                "{seconds:g} s after its GoAway; closing its session",
                client_id=self.client_id,
                remote_address=self.remote_address,
                calls=calls,
                seconds=self._server.shutdown_grace,
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
        clock = self._server.clock
        self.handshake.reject(
            rejected.code, rejected.message, lambda: clock.callLater(0, self.session.close)
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
            seconds=self._server.handshake_timeout,
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
            self._server.linger(transport, self.remote_address,
                                self.session.config.connection_write_timeout)
            self.session.on_transport_lost = lambda: self._server.closed(transport)
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
                reason=_reason_text(reason),
            )


def _reason_text(reason):
    """Why a session ended, as a log line's parenthesis: "connection was closed
    cleanly", not Twisted's "Connection was closed cleanly."."""
    text = str(getattr(reason, "value", reason) or "closed").strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


class _HandshakeGate(Factory):
    """Refuses connections while ``max_handshakes`` are in progress.

    The server stops accepting when its handshakes are full, but one accept batch
    may hold more connections; those are closed at once.
    """

    noisy = False

    def __init__(self, server, factory):
        self._server = server
        self._factory = factory

    def buildProtocol(self, addr):
        if self._server.handshakes_full:
            return None
        return self._factory.buildProtocol(addr)


class _ServerSession(YamuxSession):
    """A client's session; ``on_transport_lost`` hears when its connection is gone
    (after a polite close, later than the session's own end)."""

    on_transport_lost = None

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        if self.on_transport_lost is not None:
            self.on_transport_lost()


class _SessionFactory(Factory):
    """A yamux session per connection, behind a check of the first bytes (a gRPC
    caller or a TLS mismatch is told which endpoint or setting to use)."""

    noisy = False

    def __init__(self, server):
        self._server = server
        tls_port = server.tls_options is not None
        self._judge = lambda data: judge_multiplexer_client(data, tls_port, inside_tls=tls_port)

    def buildProtocol(self, addr):
        session = _ServerSession(
            is_client=False, config=self._server.yamux_config, clock=self._server.clock,
            tune_transport=tune_transport,
        )
        self._server.connection_accepted(session, addr)
        return PrefaceGuard(session, self._judge, describe_address)


class _PlaintextCheck(Factory):
    """In front of a TLS endpoint's factory: a client without --tls is told so."""

    noisy = False

    def __init__(self, tls_factory):
        self._tls_factory = tls_factory

    def doStart(self):
        self._tls_factory.doStart()

    def doStop(self):
        self._tls_factory.doStop()

    def buildProtocol(self, addr):
        protocol = self._tls_factory.buildProtocol(addr)
        if protocol is None:
            return None
        return PrefaceGuard(
            protocol, lambda data: judge_multiplexer_client(data, tls_port=True),
            describe_address)


class MultiplexerServer(Service):
    """Listens for multiplexer clients and keeps the registry of connected ones."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        registry,
        listener,
        handshake_timeout=10.0,
        duplicate_ping_timeout=2.0,
        yamux_config=None,
        metrics=None,
        max_clients=10000,
        tls_options=None,
        admission=None,
        shutdown_grace=10.0,
        max_handshakes=1000,
        claims=None,
    ):
        self.reactor = reactor
        # Cluster mode (grpcmux.cluster): claim(id) -> Deferred, release(id).
        self.claims = claims
        self.tls_options = tls_options  # None: plain TCP/UNIX listener
        self.admission = admission or Admission()
        self.clock = reactor
        self.registry = registry
        self._listener = listener
        self.handshake_timeout = handshake_timeout
        self.duplicate_ping_timeout = duplicate_ping_timeout
        self.yamux_config = yamux_config or YamuxConfig()
        self.max_clients = max_clients
        self.shutdown_grace = shutdown_grace  # for the calls of a client that sent GoAway
        self.max_handshakes = max_handshakes
        self.port = None
        self._handshakes = 0  # connections neither admitted nor closed yet
        self._accept_paused = False
        self._limit_logged_at = None
        self._connections = set()
        self._admitted = set()  # counted against max_clients until their session closes
        self._by_id = {}  # the listed ones
        # Transports of closed sessions still closing -> their abort call. Only the
        # transport is kept: Twisted drops its protocol (the whole session) once it
        # is really closed, so a client that closed cleanly costs nothing meanwhile.
        self._lingering = {}
        self._stopping = False
        self._claims = {}
        self.metrics = metrics or ServerMetrics()
        self.metrics.track(self)

    # service lifecycle

    def startService(self):
        factory = _SessionFactory(self)
        if self.tls_options is not None:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
            factory.noisy = False
            factory = _PlaintextCheck(factory)
        self.port = listen(self.reactor, self._listener, _HandshakeGate(self, factory),
                           "multiplexer-listener")
        super().startService()
        self._log.info(
            "multiplexer endpoint listening on {address} ({transport}; {security})",
            address=describe_address(self.port.getHost()),
            transport="TLS" if self.tls_options is not None else "no TLS",
            security=self.admission.describe(),
        )
        if (self.admission.tokens is not None and self.tls_options is None
                and not self._listener.startswith("unix:")):
            self._log.warn(
                "--auth-tokens without --tls-cert: tokens cross the network in clear"
            )
        if self.admission.allow_legacy_clients:
            self._log.warn(
                "--allow-legacy-clients: legacy clients are admitted without "
                "credentials (not under ids a token entry covers)"
            )

    def stop_accepting(self):
        """First step of a graceful stop: close the listener, GoAway to every client.

        Sessions stay up, so calls in flight on their streams can finish; the
        clients go looking for a server to reconnect to.
        """
        stopping = self.port.stopListening() if self.port is not None else succeed(None)
        self.port = None
        for connection in list(self._connections):
            connection.session.go_away(GO_AWAY_NORMAL)
        return stopping

    def stopService(self):
        super().stopService()
        self._stopping = True  # what does not close now is left to the process's exit
        for transport in list(self._lingering):
            self._linger_over(transport)
        stopping = [self.stop_accepting()]
        for connection in list(self._connections):
            connection.session.close(GO_AWAY_NORMAL)
            stopping.append(connection.session.when_closed())
            connection.depart("server stopping")
        return DeferredList(stopping)

    # connections

    def connection_accepted(self, session, addr):
        connection = _ClientConnection(self, session, describe_address(addr))
        self._connections.add(connection)
        self._handshakes += 1
        if self.handshakes_full:
            self._pause_accepting()

    @property
    def handshakes_full(self):
        return self._handshakes >= self.max_handshakes

    def _pause_accepting(self):
        """Leave new connections in the listen backlog until a handshake finishes."""
        if self._accept_paused or not IPushProducer.providedBy(self.port):
            return
        self._accept_paused = True
        self.port.pauseProducing()
        now = self.clock.seconds()
        if self._limit_logged_at is None or now - self._limit_logged_at >= HANDSHAKE_LIMIT_LOG_INTERVAL:
            self._limit_logged_at = now
            self._log.warn(
                "{count} handshakes in progress, the most allowed (--max-handshakes); "
                "new connections wait until one finishes",
                count=self._handshakes,
            )

    def _handshake_over(self, connection):
        if not connection.handshaking:
            return
        connection.handshaking = False
        self._handshakes -= 1
        if self._accept_paused and not self.handshakes_full:
            self._accept_paused = False
            if self.port is not None:
                self.port.resumeProducing()

    def admit(self, connection):
        """Decide on a client's hello; fails with ``HandshakeRejected`` to refuse.

        While a decision is pending the id is claimed by that connection, so two
        newcomers with one id cannot both get in.
        """
        client_id = connection.client_id
        problem = client_id_problem(client_id)
        if problem is not None:
            return fail(HandshakeRejected(Reject.CODE_BAD_CLIENT_ID, problem))
        refusal = self.admission.refusal(
            connection.hello, tls.peer_names(connection.session.transport)
        )
        if refusal is not None:
            return fail(refusal)
        if client_id in self._claims:
            return fail(self._already_connected(client_id))
        existing = self._by_id.get(client_id)
        if existing is None and len(self._admitted) + len(self._claims) >= self.max_clients:
            return fail(HandshakeRejected(
                Reject.CODE_RESOURCE_EXHAUSTED,
                f"the server has its maximum of {self.max_clients} clients connected; "
                "try again later or another server",
            ))
        self._claims[client_id] = connection
        decided = succeed(None) if existing is None else self._challenge(existing, connection)
        if self.claims is not None:
            decided.addCallback(lambda _: self._cluster_claim(connection))
        return decided

    def _cluster_claim(self, connection):
        """Claim the id cluster-wide too (a live holder on another node keeps it)."""
        connection.cluster_claimed = True
        d = self.claims.claim(connection.client_id)
        d.addErrback(self._cluster_refused, connection)
        return d

    def _cluster_refused(self, failure, connection):
        connection.cluster_claimed = False
        self._release_claim(connection)
        return failure

    def _challenge(self, existing, newcomer):
        """Ping the current holder of an id: a live one keeps it, a dead one is replaced."""
        client_id = newcomer.client_id
        pinged = existing.session.ping()
        pinged.addTimeout(self.duplicate_ping_timeout, self.clock)

        def alive(_):
            self._release_claim(newcomer)
            raise self._already_connected(client_id)

        def dead(failure):
            self._log.info(
                "client {client_id} reconnected; replacing its unresponsive session "
                "from {remote_address}",
                client_id=client_id,
                remote_address=existing.remote_address,
            )
            existing.depart("replaced by a new connection")
            existing.session.abort()

        return pinged.addCallbacks(alive, dead)

    def _release_claim(self, connection):
        if self._claims.get(connection.client_id) is connection:
            del self._claims[connection.client_id]

    @staticmethod
    def _already_connected(client_id):
        return HandshakeRejected(
            Reject.CODE_ALREADY_EXISTS,
            f"client id {client_id!r} is already connected; pick another id "
            "or stop the other client",
        )

    def linger(self, transport, remote_address, seconds):
        """Abort the transport of a closed session unless it is gone in ``seconds``."""
        if not self._stopping:
            self._lingering[transport] = self.clock.callLater(
                seconds, self._linger_over, transport, remote_address, seconds)

    def closed(self, transport):
        """A lingering transport is gone by itself: forget it."""
        call = self._lingering.pop(transport, None)
        if call is not None and call.active():
            call.cancel()

    def _linger_over(self, transport, remote_address=None, seconds=None):
        call = self._lingering.pop(transport)
        if call.active():
            call.cancel()
        if transport.connected:
            if seconds is not None:
                self._log.warn(
                    "connection from {remote_address} still open {seconds:g} s after "
                    "its session closed (the peer reads nothing); aborting it",
                    remote_address=remote_address, seconds=seconds)
            transport.abortConnection()

    def tunnel_for(self, client_id):
        """The upstream target of the admitted client ``client_id``, or None."""
        connection = self._by_id.get(client_id)
        return connection.tunnel if connection is not None else None

    def register(self, connection):
        client_id = connection.client_id
        self._release_claim(connection)
        self._by_id[client_id] = connection
        self._admitted.add(connection)
        self._handshake_over(connection)
        hello = connection.hello
        self.registry.add(
            ClientInfo(
                client_id=client_id,
                connected_at=time.time(),
                remote_address=connection.remote_address,
                wire_protocol=hello.wire_protocol,
                labels=hello.labels,
            )
        )
        self._log.info(
            "client {client_id} connected from {remote_address} ({wire_protocol})",
            client_id=client_id,
            remote_address=connection.remote_address,
            wire_protocol=hello.wire_protocol,
        )

    def health_reported(self, connection, health, detail):
        """A client's report on its gRPC server; only its current registration counts."""
        if self._by_id.get(connection.client_id) is connection:
            record_health(self.registry, connection.client_id, health, detail)

    def retire(self, connection):
        """Unlist a leaving client (gracefully); a newcomer may take its id."""
        if self._by_id.get(connection.client_id) is connection:
            del self._by_id[connection.client_id]
            self.registry.remove(connection.client_id, graceful=True)

    def forget(self, connection):
        self._connections.discard(connection)
        self._admitted.discard(connection)
        self._handshake_over(connection)
        if connection.client_id is None:
            return
        self._release_claim(connection)
        if connection.cluster_claimed and not connection.admitted:
            connection.cluster_claimed = False
            self.claims.release(connection.client_id)
        if connection.admitted and self._by_id.get(connection.client_id) is connection:
            del self._by_id[connection.client_id]
            self.registry.remove(connection.client_id)

    def disconnect(self, client_id, reason):
        """Close the session of ``client_id`` (cluster: another node owns the id)."""
        connection = self._by_id.get(client_id)
        if connection is not None:
            connection.session.close(GO_AWAY_NORMAL)
            connection.depart(reason)

    @property
    def connected_clients(self):
        return dict(self._by_id)


class ServerService(MultiService):
    """Both endpoints, stopped in the order that lets calls in flight finish.

    On stop: the multiplexer endpoint stops accepting and sends GoAway(0) to every
    client; the proxy stops taking calls and gives running ones up to the grace
    period; only then are the client sessions closed.  The metrics endpoint, if
    any, stops last, so a scrape can watch the shutdown.
    """

    def __init__(self, multiplexer, proxy, metrics_service=None):
        super().__init__()
        self.multiplexer = multiplexer
        self.proxy = proxy
        self.metrics_service = metrics_service
        # Started in this order: metrics needs nothing, and the proxy, which makes a
        # runtime directory, comes last, so a listener that cannot be had stops
        # start-up before anything is left behind.
        if metrics_service is not None:
            metrics_service.setName("metrics")
            metrics_service.setServiceParent(self)
        multiplexer.setName("multiplexer")
        multiplexer.setServiceParent(self)
        proxy.setName("proxy")
        proxy.setServiceParent(self)

    def startService(self):
        try:
            super().startService()
        except BaseException:
            self._abandon_start()
            raise

    def _abandon_start(self):
        """A listener could not be had: stop what did start (nothing waits for it)."""
        Service.stopService(self)
        for service in reversed(list(self)):
            if service.running:
                stopped = service.stopService()
                if stopped is not None:
                    stopped.addErrback(lambda _: None)  # twistd exits meanwhile

    def stopService(self):
        Service.stopService(self)
        stopped = self.multiplexer.stop_accepting()
        stopped.addCallback(lambda _: self.proxy.stopService())
        stopped.addCallback(lambda _: self.multiplexer.stopService())
        if self.metrics_service is not None:
            stopped.addCallback(lambda _: self.metrics_service.stopService())
        return stopped


def security_options(settings):
    """``tls_options`` and ``admission`` for ``MultiplexerServer`` from settings
    (whose files the settings read and checked when they were made)."""
    admission = Admission(
        tokens=settings.client_tokens,
        client_ca=bool(settings.tls_client_ca),
        client_id_from_cert=settings.client_id_from_cert,
        allow_legacy_clients=settings.allow_legacy_clients,
    )
    return {"tls_options": settings.tls_options, "admission": admission}


def raise_open_file_limit():
    """Raise the soft limit on open files to the hard limit, as Go programs do at start.

    Each connected client holds a descriptor here, each caller another, so the usual
    soft limit of 1,024 would turn clients away early while the hard limit (often
    524,288 under systemd) allows far more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    log = MultiplexerServer._log
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        log.warn("cannot raise the open-file limit from {soft} to {hard}: {error}",
                 soft=soft, hard=hard, error=error)
        return soft
    log.info("open-file limit raised from {soft} to {hard} (one per client and per caller)",
             soft=soft, hard=hard)
    return hard


def make_service(settings, reactor):
    """The whole server for twistd: multiplexer endpoint plus proxy endpoint."""
    from grpcmux.proxy import ProxyService
    from grpcmux.rpc.security import load_proxy_security

    raise_open_file_limit()
    metrics = ServerMetrics()
    cluster = None
    registry = ClientRegistry()
    if settings.cluster_etcd:
        from grpcmux.cluster.node import cluster_registry

        registry = cluster = cluster_registry(settings, reactor, metrics.registry)
    multiplexer = MultiplexerServer(
        reactor,
        registry,
        settings.multiplexer_listener,
        handshake_timeout=settings.handshake_timeout,
        duplicate_ping_timeout=settings.duplicate_ping_timeout,
        yamux_config=YamuxConfig(
            keepalive_interval=settings.keepalive_interval,
            connection_write_timeout=settings.keepalive_timeout,
            max_streams=settings.max_streams_per_client,
            max_stream_window_size=settings.stream_window,
        ),
        metrics=metrics,
        max_clients=settings.max_clients,
        max_handshakes=settings.max_handshakes,
        shutdown_grace=settings.shutdown_grace,
        claims=cluster,
        **security_options(settings),
    )
    if cluster is not None:
        cluster.evict = multiplexer.disconnect
    proxy_security = load_proxy_security(settings)
    cluster_options = {}
    if cluster is not None:
        from grpcmux.cluster.node import proxy_options

        cluster_options = proxy_options(settings, reactor, cluster)
    proxy = ProxyService(
        reactor,
        registry,
        settings.proxy_listener,
        tunnels=multiplexer.tunnel_for,
        cluster_health=cluster.add_health_observer if cluster is not None else None,
        **cluster_options,
        authority_domain=settings.authority_domain,
        default_client_id=settings.default_client_id,
        max_message_size=settings.max_message_size,
        shutdown_grace=settings.shutdown_grace,
        observer=metrics.call_finished,
        max_concurrent_calls=settings.max_proxy_calls,
        max_calls_per_client=settings.max_calls_per_client,
        watch_queue_limit=settings.watch_queue_limit,
        tls=proxy_security.tls,
        tokens=proxy_security.tokens,
        runtime_dir=settings.runtime_dir,
    )
    metrics.track_proxy(proxy)
    metrics_service = None
    if settings.metrics_listener:
        metrics_service = MetricsService(reactor, settings.metrics_listener, metrics.registry,
                                         status=metrics)
    service = ServerService(multiplexer, proxy, metrics_service)
    if cluster is not None:
        from grpcmux.cluster.node import ClusterNode

        return ClusterNode(cluster, service)
    return service
