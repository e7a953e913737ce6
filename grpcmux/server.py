"""The multiplexer endpoint: accepts clients, admits them, and lists them for the proxy.

Each accepted connection becomes a :class:`~grpcmux.client_connection.ClientConnection`
(its handshake and its life); the :class:`~grpcmux.client_table.ClientTable` decides
who gets which id; an admitted client gets an entry in the ``ClientRegistry`` that
the proxy and Discovery read, and an upstream target (``tunnel_for``) through which
the proxy's router opens streams to it.  The connection is forgotten the moment its
session ends.
"""

import time

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger

from grpcmux.accepting import listener_factory
from grpcmux.addresses import describe_address
from grpcmux.admission import Admission
from grpcmux.backend_health import record_health
from grpcmux.client_connection import ClientConnection
from grpcmux.client_table import ClientTable
from grpcmux.lingering import LingeringTransports
from grpcmux.listening import listen
from grpcmux.metrics import ServerMetrics
from grpcmux.registry import ClientInfo
from grpcmux.yamux.frame import GO_AWAY_NORMAL

#: Seconds between two log lines saying that the handshake limit holds connections back.
HANDSHAKE_LIMIT_LOG_INTERVAL = 60.0


class MultiplexerServer(Service):
    """Listens for multiplexer clients and keeps the registry of connected ones.

    ``settings`` (ServerSettings) give the listener, its TLS and admission policy,
    the timeouts and limits; ``metrics`` (ServerMetrics) count what happens;
    ``cluster_claims``, in a cluster, claims ids cluster-wide (see ``ClientTable``).
    """

    _log = Logger()

    def __init__(self, reactor, registry, settings, metrics=None, cluster_claims=None):
        self.reactor = reactor
        self.registry = registry
        self.settings = settings
        self.tls_options = settings.tls_options  # None: plain TCP/UNIX listener
        self.admission = Admission.from_settings(settings)
        self.yamux_config = settings.yamux_config(max_streams=settings.max_streams_per_client)
        self.clients = ClientTable(reactor, settings, self.admission, cluster_claims)
        self.lingering = LingeringTransports(reactor)
        self.port = None
        self._connections = set()
        self._handshaking = set()  # connections neither admitted nor closed yet
        self._accept_paused = False
        self._limit_logged_at = None
        self.metrics = metrics or ServerMetrics()
        self.metrics.track(self)

    # service lifecycle

    def startService(self):
        self.port = listen(self.reactor, self.settings.multiplexer_listener,
                           listener_factory(self), "multiplexer-listener")
        super().startService()
        self._log.info(
            "multiplexer endpoint listening on {address} ({transport}; {security})",
            address=describe_address(self.port.getHost()),
            transport="TLS" if self.tls_options is not None else "no TLS",
            security=self.admission.describe(),
        )
        if (self.admission.tokens is not None and self.tls_options is None
                and not self.settings.multiplexer_listener.startswith("unix:")):
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
        self.lingering.abort_all()  # what does not close now is left to the process's exit
        stopping = [self.stop_accepting()]
        for connection in list(self._connections):
            connection.session.close(GO_AWAY_NORMAL)
            stopping.append(connection.session.when_closed())
            connection.depart("server stopping")
        return DeferredList(stopping)

    # connections

    @property
    def connections(self):
        """The connections from accept to departure, a tuple."""
        return tuple(self._connections)

    def connection_accepted(self, session, addr):
        connection = ClientConnection(self, session, describe_address(addr))
        self._connections.add(connection)
        self._handshaking.add(connection)
        if self.handshakes_full:
            self._pause_accepting()

    @property
    def handshakes_in_progress(self):
        """Connections neither admitted nor closed yet."""
        return len(self._handshaking)

    @property
    def handshakes_full(self):
        return len(self._handshaking) >= self.settings.max_handshakes

    def _pause_accepting(self):
        """Leave new connections in the listen backlog until a handshake finishes."""
        if self._accept_paused or not IPushProducer.providedBy(self.port):
            return
        self._accept_paused = True
        self.port.pauseProducing()
        now = self.reactor.seconds()
        if self._limit_logged_at is None or now - self._limit_logged_at >= HANDSHAKE_LIMIT_LOG_INTERVAL:
            self._limit_logged_at = now
            self._log.warn(
                "{count} handshakes in progress, the most allowed (--max-handshakes); "
                "new connections wait until one finishes",
                count=len(self._handshaking),
            )

    def _handshake_over(self, connection):
        if connection not in self._handshaking:
            return
        self._handshaking.discard(connection)
        if self._accept_paused and not self.handshakes_full:
            self._accept_paused = False
            if self.port is not None:
                self.port.resumeProducing()

    def admit(self, connection):
        """Decide on a client's hello; fails with ``HandshakeRejected`` to refuse."""
        return self.clients.admit(connection)

    def register(self, connection):
        """List an admitted client: in the registry, and as the holder of its id."""
        self.clients.list(connection)
        self._handshake_over(connection)
        hello = connection.hello
        self.registry.add(
            ClientInfo(
                client_id=connection.client_id,
                connected_at=time.time(),
                remote_address=connection.remote_address,
                wire_protocol=hello.wire_protocol,
                labels=hello.labels,
            )
        )
        self._log.info(
            "client {client_id} connected from {remote_address} ({wire_protocol})",
            client_id=connection.client_id,
            remote_address=connection.remote_address,
            wire_protocol=hello.wire_protocol,
        )

    def health_reported(self, connection, health, detail):
        """A client's report on its gRPC server; only its current registration counts."""
        if self.clients.is_listed(connection):
            record_health(self.registry, connection.client_id, health, detail)

    def retire(self, connection):
        """Unlist a leaving client (gracefully); a newcomer may take its id."""
        if self.clients.unlist(connection):
            self.registry.remove(connection.client_id, graceful=True)

    def forget(self, connection):
        """``connection``'s session ended: it holds nothing any more."""
        self._connections.discard(connection)
        self._handshake_over(connection)
        if self.clients.forget(connection):
            self.registry.remove(connection.client_id)

    def tunnel_for(self, client_id):
        """The upstream target of the admitted client ``client_id``, or None."""
        connection = self.clients.holder(client_id)
        return connection.tunnel if connection is not None else None

    def disconnect(self, client_id, reason):
        """Close the session of ``client_id`` (cluster: another node owns the id)."""
        connection = self.clients.holder(client_id)
        if connection is not None:
            connection.session.close(GO_AWAY_NORMAL)
            connection.depart(reason)

    @property
    def connected_clients(self):
        """Client id -> the connection calls for it go to, a copy."""
        return self.clients.listed
