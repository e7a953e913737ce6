"""The multiplexer server: accepts clients, admits them, and bridges the proxy to them.

Per accepted connection (``_ClientConnection``): a yamux server session; the
client's first stream carries the handshake (native or legacy, told apart by its
first byte); once admitted, the client gets a private UNIX socket (``Bridge``) and an
entry in the ``ClientRegistry`` that the proxy and Discovery read.  The connection
is forgotten, socket and entry included, the moment its session ends.
"""

import os
import re
import resource
import shutil
import stat
import tempfile
import time

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from grpcmux import __version__, tls
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.addresses import server_endpoint
from grpcmux.admission import Admission
from grpcmux.bridge import Bridge
from grpcmux.handshake import WIRE_NATIVE, HandshakeRejected, ServerHandshake
from grpcmux.ids import client_id_problem
from grpcmux.metrics import (
    ACCEPTED,
    FAILED,
    REJECTED,
    TIMED_OUT,
    MetricsService,
    ServerMetrics,
    reject_reason,
)
from grpcmux.registry import ClientInfo, ClientRegistry
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.frame import GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR
from grpcmux.yamux.session import YamuxSession

Reject = tunnel_pb2.Reject
# The bridge sockets this server names in its runtime directory.
_SOCKET_NAME = re.compile(r"[0-9]+\.sock")


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
        self.bridge = None
        self.inner_session = None
        self.admitted = False
        self.cluster_claimed = False  # claimed in the cluster registry, not yet admitted
        self._departed = False
        self._socket_removed = None
        self.handshake = ServerHandshake(
            self._hello_received, self._handshake_failed, self._make_inner_session
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
        try:
            if self.handshake.wire_protocol == WIRE_NATIVE:
                # The bridge listens before the Welcome: a client told it is admitted
                # can be reached.
                stream_session = self.session
                self.bridge = self._server.bridge_for(self, stream_session)
                self.handshake.accept(welcome)
            else:
                # A legacy client is told nothing; its streams run on the inner session.
                stream_session = self.handshake.accept(welcome)
                self.bridge = self._server.bridge_for(self, stream_session)
        except CannotListenError as error:
            self._log.error(
                "cannot serve client {client_id} from {remote_address}: its bridge "
                "socket cannot listen: {error}",
                client_id=self.client_id,
                remote_address=self.remote_address,
                error=error.socketError,
            )
            self._reject(HandshakeRejected(
                tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED,
                "the server cannot open a socket for this client now; try again later",
            ))
            return
        self.admitted = True
        self._server.register(self)
        stream_session.when_go_away().addCallback(self._leaving)
        self._server.metrics.handshake(ACCEPTED)

    def _leaving(self, _):
        """The client sent GoAway (it is stopping): route nothing new to it.

        Its calls in flight go on; the proxy closes its channel once they are done,
        which lets the client finish draining and close the session.
        """
        self._log.info(
            "client {client_id} is leaving; its calls in flight may finish",
            client_id=self.client_id,
            remote_address=self.remote_address,
        )
        self._server.retire(self)

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
        problem = tls.failure_reason(reason) if self.hello is None else None
        if problem is not None:
            self._log.warn(
                "TLS with {remote_address} failed: {reason}",
                remote_address=self.remote_address,
                reason=problem,
            )
        self.depart(reason)

    def depart(self, reason=None):
        """Remove this client from the registry and its socket from disk, once.

        Returns a Deferred firing once the socket file is gone.
        """
        if self._departed:
            return self._socket_removed
        self._departed = True
        self._socket_removed = succeed(None)
        self._server.forget(self)
        self._server.metrics.session_closed(self.session)
        if self.bridge is not None:
            self._socket_removed = self._server.bridge_closing(self.bridge.stop())
        if self.admitted:
            self._log.info(
                "client {client_id} disconnected ({reason})",
                client_id=self.client_id,
                remote_address=self.remote_address,
                reason=reason or "closed",
            )
        return self._socket_removed


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, server):
        self._server = server

    def buildProtocol(self, addr):
        session = YamuxSession(
            is_client=False, config=self._server.yamux_config, clock=self._server.clock
        )
        self._server.connection_accepted(session, addr)
        return session


class MultiplexerServer(Service):
    """Listens for multiplexer clients and keeps the registry of connected ones."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        registry,
        listener,
        runtime_dir=None,
        handshake_timeout=10.0,
        duplicate_ping_timeout=2.0,
        yamux_config=None,
        metrics=None,
        max_clients=10000,
        tls_options=None,
        admission=None,
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
        self._runtime_dir_option = runtime_dir
        self.runtime_dir = None
        self.handshake_timeout = handshake_timeout
        self.duplicate_ping_timeout = duplicate_ping_timeout
        self.yamux_config = yamux_config or YamuxConfig()
        self.max_clients = max_clients
        self.port = None
        self._connections = set()
        self._by_id = {}
        self._claims = {}
        self._socket_counter = 0
        self._bridges_closing = set()  # stopListening Deferreds of departed bridges
        self.metrics = metrics or ServerMetrics()
        self.metrics.track(self)

    # service lifecycle

    def startService(self):
        super().startService()
        self.runtime_dir = self._make_runtime_dir()
        endpoint = server_endpoint(self.reactor, self._listener)
        factory = _SessionFactory(self)
        if self.tls_options is not None:
            factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
        self.port = _listen_now(endpoint, factory)
        self._log.info(
            "multiplexer endpoint listening on {address} ({transport}; {security})",
            address=_describe(self.port.getHost()),
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
        stopping = [self.stop_accepting()]
        for connection in list(self._connections):
            connection.session.close(GO_AWAY_NORMAL)
            stopping.append(connection.session.when_closed())
            stopping.append(connection.depart("server stopping"))
        done = DeferredList(stopping)
        # Stopped means the bridge sockets are gone too: a server started next in
        # the same runtime directory reuses their names.
        done.addCallback(lambda _: DeferredList(list(self._bridges_closing)))
        done.addCallback(lambda _: self._remove_runtime_dir())
        return done

    def _make_runtime_dir(self):
        """The bridge sockets' directory: ours, 0700, without a crashed run's sockets."""
        path = self._runtime_dir_option
        if not path:
            return tempfile.mkdtemp(prefix="grpcmux-")  # 0700 whatever the umask
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass  # not a directory: refused below
        except OSError as error:
            raise OSError(f"cannot create runtime directory {path}: {error.strerror}") from None
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(
                f"runtime directory {path} must be a directory (not a link) owned by "
                f"the user running grpcmux (uid {os.getuid()})"
            )
        os.chmod(path, 0o700)
        for name in os.listdir(path):
            socket_path = os.path.join(path, name)
            if _SOCKET_NAME.fullmatch(name) and stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                os.unlink(socket_path)
        return path

    def _remove_runtime_dir(self):
        if self.runtime_dir and not self._runtime_dir_option:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # connections

    def connection_accepted(self, session, addr):
        connection = _ClientConnection(self, session, _describe(addr))
        self._connections.add(connection)

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
        if existing is None and len(self._by_id) + len(self._claims) >= self.max_clients:
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

    def bridge_closing(self, stopped):
        """Track a departed bridge until its socket is removed (``stopped`` fires)."""
        self._bridges_closing.add(stopped)
        stopped.addBoth(self._bridge_closed, stopped)
        return stopped

    def _bridge_closed(self, result, stopped):
        self._bridges_closing.discard(stopped)
        return result

    def bridge_for(self, connection, stream_session):
        self._socket_counter += 1
        path = os.path.join(self.runtime_dir, f"{self._socket_counter}.sock")
        bridge = Bridge(self.reactor, path, stream_session, connection.client_id)
        bridge.start()
        return bridge

    def register(self, connection):
        client_id = connection.client_id
        self._release_claim(connection)
        self._by_id[client_id] = connection
        hello = connection.hello
        self.registry.add(
            ClientInfo(
                client_id=client_id,
                socket_path=connection.bridge.socket_path,
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

    def retire(self, connection):
        """Unlist a leaving client (gracefully); a newcomer may take its id."""
        if self._by_id.get(connection.client_id) is connection:
            del self._by_id[connection.client_id]
            self.registry.remove(connection.client_id, graceful=True)

    def forget(self, connection):
        self._connections.discard(connection)
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


def _listen_now(endpoint, factory):
    """Listen and return the port, raising at once if that fails.

    Every endpoint we accept listens synchronously; raising from ``startService``
    makes twistd report the problem and exit instead of running without a port.
    """
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError(f"endpoint {endpoint!r} did not start listening synchronously")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def _describe(address):
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        multiplexer.setName("multiplexer")
        multiplexer.setServiceParent(self)
        proxy.setName("proxy")
        proxy.setServiceParent(self)
        if metrics_service is not None:
            metrics_service.setName("metrics")
            metrics_service.setServiceParent(self)

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

    Each connected client holds two descriptors here (its connection and its bridge
    socket), so the usual soft limit of 1,024 would turn clients away past about 500
    while the hard limit (often 524,288 under systemd) allows far more.
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
    log.info("open-file limit raised from {soft} to {hard} (two per connected client)",
             soft=soft, hard=hard)
    return hard


def make_service(settings, reactor):
    """The whole server for twistd: multiplexer endpoint plus proxy endpoint."""
    from grpcmux.rpc.security import load_proxy_security
    from grpcmux.rpc.service import ProxyService
    from grpcmux.rpc.workers import ProxyWorkerPool

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
        runtime_dir=settings.runtime_dir,
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
        claims=cluster,
        **security_options(settings),
    )
    if cluster is not None:
        cluster.evict = multiplexer.disconnect
    proxy_options = dict(
        authority_domain=settings.authority_domain,
        default_client_id=settings.default_client_id,
        max_message_size=settings.max_message_size,
    )
    if settings.proxy_workers:
        # Each worker enforces its share of the call limits and reads the same TLS
        # and token files, so N workers secure and bound the port as one would.
        share = settings.proxy_workers
        proxy = ProxyWorkerPool(
            reactor,
            registry,
            settings.proxy_listener,
            settings.proxy_workers,
            lambda: multiplexer.runtime_dir,
            shutdown_grace=settings.shutdown_grace,
            log_level=settings.log_level,
            max_concurrent_calls=-(-settings.max_proxy_calls // share),
            max_calls_per_client=-(-settings.max_calls_per_client // share),
            proxy_tls_cert=settings.proxy_tls_cert,
            proxy_tls_key=settings.proxy_tls_key,
            proxy_tls_client_ca=settings.proxy_tls_client_ca,
            proxy_auth_tokens=settings.proxy_auth_tokens,
            **proxy_options,
        )
    else:
        proxy_security = load_proxy_security(settings)
        proxy = ProxyService(
            reactor,
            registry,
            settings.proxy_listener,
            shutdown_grace=settings.shutdown_grace,
            call_observer=metrics.call_started,
            max_concurrent_calls=settings.max_proxy_calls,
            max_calls_per_client=settings.max_calls_per_client,
            tls=proxy_security.tls,
            tokens=proxy_security.tokens,
            **proxy_options,
        )
    metrics_service = None
    if settings.metrics_listener:
        metrics_service = MetricsService(reactor, settings.metrics_listener, metrics.registry)
    service = ServerService(multiplexer, proxy, metrics_service)
    if cluster is not None:
        from grpcmux.cluster.node import ClusterNode

        return ClusterNode(cluster, service)
    return service
