"""Prometheus metrics for the server and the client, served over HTTP at /metrics.

Each service graph owns its own ``CollectorRegistry`` (never the global default),
so a process, or a test, can hold many.  Live state (clients, sessions, streams,
bytes) is read at scrape time by a collector; events (handshakes, calls, reconnects)
are counted with one increment where they happen.

``MetricsResource`` renders on the reactor's thread pool, so the collectors only
take atomic reads of reactor-owned state: the registry's immutable snapshot, a
``tuple()`` copy of a set, ``len()`` of a set, plain integers.

The server's listener also serves the status page (:mod:`grpcmux.status`) at ``/``;
its per-client rows come from :meth:`ServerMetrics.clients`.
"""

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.listening import listen
from grpcmux.registry import DISCONNECTED, HEALTH_VALUES

# Handshake outcomes (the ``outcome`` label); ``reason`` is set for rejections only.
ACCEPTED = "accepted"
REJECTED = "rejected"
FAILED = "failed"
TIMED_OUT = "timed_out"

_WIRE_PROTOCOLS = ("native", "legacy")


def reject_reason(code):
    """The ``reason`` label of a Reject code: ``CODE_ALREADY_EXISTS`` -> ``already_exists``."""
    try:
        name = tunnel_pb2.Reject.Code.Name(code)
    except ValueError:
        return str(code)
    return name.removeprefix("CODE_").lower()


class MetricsService(Service):
    """Serves a registry's metrics over HTTP (``GET /metrics``) on a Twisted endpoint."""

    _log = Logger()

    def __init__(self, reactor, listener, registry, status=None):
        self._reactor = reactor
        self.listener = listener
        self.registry = registry
        # What the status page at / shows (a ServerMetrics); None: no status page.
        self.status = status
        self.port = None

    def startService(self):
        # Imported here: prometheus_client.twisted imports the global reactor.
        from prometheus_client.twisted import MetricsResource

        root = _Root()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        if self.status is not None:
            from grpcmux.status import add_status_page

            add_status_page(root, self.status)
        site = _QuietSite(root)
        self.port = listen(self._reactor, self.listener, site, "metrics-listener")
        super().startService()
        address = self.port.getHost()
        self._log.info("metrics on http://{host}:{port}/metrics",
                       host=getattr(address, "host", address), port=getattr(address, "port", ""))

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _QuietSite(Site):
    """A Site without an access line per request: Prometheus records its scrapes,
    and one line every 15 s per scraper is noise in the operator's log."""

    noisy = False

    def log(self, request):
        pass


class _Root(Resource):
    """Only /metrics (and the status page's paths) exist; anything else is a plain 404."""

    def getChild(self, path, request):
        return notFound()


def _handshakes(prefix, registry):
    return Counter(
        f"{prefix}_handshakes",
        "Handshakes by outcome (accepted, rejected, failed, timed_out); "
        "reason: the Reject code of a rejection.",
        ["outcome", "reason"],
        registry=registry,
    )


# How far back a client's calls/s looks, in seconds.
RATE_WINDOW = 10


class ClientStats:
    """One connected client's calls, as the proxy counts them (reactor thread only)."""

    def __init__(self, clock):
        self._clock = clock
        self.calls = 0  # finished calls
        self.errors = 0  # finished with a status other than OK
        self._recent = deque()  # [whole second, calls finished in it], oldest first

    def finished(self, code_name):
        self.calls += 1
        if code_name != "OK":
            self.errors += 1
        second = int(self._clock())
        if self._recent and self._recent[-1][0] == second:
            self._recent[-1][1] += 1
        else:
            self._recent.append([second, 1])
        self._forget_old(second)

    def _forget_old(self, now):
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW:
            self._recent.popleft()

    def calls_per_second(self):
        """Calls finished per second over the last RATE_WINDOW seconds."""
        self._forget_old(int(self._clock()))
        return sum(count for _, count in self._recent) / RATE_WINDOW


@dataclass(frozen=True)
class ClientStatus:
    """One row of the status page: a connected client and its traffic."""

    client_id: str
    labels: Tuple[Tuple[str, str], ...]
    wire_protocol: str
    remote_address: str
    connected_at: float  # POSIX seconds
    # None where not known: health where the registry has none, node outside a
    # cluster (issue 13), bytes of a client whose session is on another node.
    health: Optional[str] = None
    node: Optional[str] = None
    calls_per_second: Optional[float] = None
    calls: Optional[int] = None
    errors: Optional[int] = None
    bytes_received: Optional[int] = None
    bytes_sent: Optional[int] = None


class ServerMetrics:
    """The multiplexer server's metrics; ``track(server)`` makes its live state visible."""

    def __init__(self, registry=None, clock=time.monotonic):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._client_stats = {}  # client id -> ClientStats, while connected
        self.handshakes = _handshakes("grpcmux_server", self.registry)
        self.calls = Counter(
            "grpcmux_proxy_calls",
            "Calls through the proxy endpoint by gRPC status code and client id "
            "(client \"\": answered by the proxy itself).",
            ["code", "client"], registry=self.registry)
        self.call_seconds = Histogram(
            "grpcmux_proxy_call_duration_seconds", "Proxied call latency in seconds.",
            registry=self.registry)
        self.call_bytes = Counter(
            "grpcmux_proxy_call_bytes",
            "DATA bytes of calls through the proxy endpoint, by direction "
            "(received from callers, sent to callers).",
            ["direction"], registry=self.registry)
        # Their two series, resolved once: call_finished runs for every call.
        self._bytes_received = self.call_bytes.labels(direction="received")
        self._bytes_sent = self.call_bytes.labels(direction="sent")
        self._live = _ServerCollector()
        self.registry.register(self._live)

    def track(self, server):
        """Report the connections of ``server`` (a MultiplexerServer) from now on."""
        self._live.server = server
        server.registry.subscribe(self._registry_changed)

    def _registry_changed(self, event):
        if event.kind == DISCONNECTED:
            self._client_stats.pop(event.info.client_id, None)

    def client_stats(self, client_id):
        """The ClientStats of a connected client, made on first use; else None.

        Only connected ids get one, so calls naming made-up ids cost no memory.
        """
        stats = self._client_stats.get(client_id)
        server = self._live.server
        if stats is None and server is not None and client_id in server.registry.snapshot:
            stats = self._client_stats[client_id] = ClientStats(self._clock)
        return stats

    @property
    def client_ids_with_stats(self):
        """The ids that have ClientStats now (sorted): connected ones only."""
        return sorted(self._client_stats)

    def clients(self):
        """A ClientStatus per connected client, by id (reactor thread)."""
        server = self._live.server
        if server is None:
            return []
        connections = server.connected_clients
        rows = []
        for client_id, info in sorted(server.registry.snapshot.items()):
            connection = connections.get(client_id)
            session = connection.session if connection is not None else None
            stats = self._client_stats.get(client_id)
            rows.append(ClientStatus(
                client_id=client_id,
                labels=tuple(info.labels),
                wire_protocol=info.wire_protocol,
                remote_address=info.remote_address,
                connected_at=info.connected_at,
                health=getattr(info, "health", None),
                node=getattr(info, "node", None),
                bytes_received=session.bytes_received if session is not None else None,
                bytes_sent=session.bytes_sent if session is not None else None,
                calls_per_second=stats.calls_per_second() if stats else 0.0,
                calls=stats.calls if stats else 0,
                errors=stats.errors if stats else 0,
            ))
        return rows

    def handshake(self, outcome, reason=""):
        self.handshakes.labels(outcome=outcome, reason=reason).inc()

    def session_closed(self, session):
        """Keep the byte totals of a session that ended, so the counters never go down."""
        self._live.closed_in += session.bytes_received
        self._live.closed_out += session.bytes_sent

    def track_proxy(self, proxy):
        """Report the open streams and upstream connections of ``proxy`` from now on."""
        self._live.proxy = proxy

    def call_finished(self, client, code_name, seconds, bytes_in, bytes_out):
        """Record one call through the proxy endpoint (the router calls it once per call).

        ``client``: the client id the call was routed to ("" for the proxy's own
        services); a connected client's call also counts on the status page.
        """
        self.calls.labels(code=code_name, client=client).inc()
        stats = self.client_stats(client) if client else None
        if stats is not None:
            stats.finished(code_name)
        self.call_seconds.observe(seconds)
        if bytes_in:
            self._bytes_received.inc(bytes_in)
        if bytes_out:
            self._bytes_sent.inc(bytes_out)


class _ServerCollector:
    """Reads a MultiplexerServer's connections at scrape time."""

    def __init__(self):
        self.server = None
        self.proxy = None
        self.closed_in = 0
        self.closed_out = 0

    def describe(self):
        return []  # no samples at registration: the server may not exist yet

    def collect(self):
        server = self.server
        snapshot = server.registry.snapshot if server is not None else {}
        connections = server.connections if server is not None else ()
        clients = GaugeMetricFamily(
            "grpcmux_server_connected_clients", "Admitted clients by wire protocol.",
            labels=["wire_protocol"])
        by_protocol = dict.fromkeys(_WIRE_PROTOCOLS, 0)
        for info in snapshot.values():
            by_protocol[info.wire_protocol] = by_protocol.get(info.wire_protocol, 0) + 1
        for protocol, count in sorted(by_protocol.items()):
            clients.add_metric([protocol], count)
        yield clients
        health = GaugeMetricFamily(
            "grpcmux_server_client_backend_health",
            "Admitted clients by the health they report of their gRPC server "
            "(unknown, serving, not_serving).", labels=["health"])
        by_health = dict.fromkeys(HEALTH_VALUES, 0)
        for info in snapshot.values():
            by_health[info.health] += 1
        for value, count in by_health.items():
            health.add_metric([value], count)
        yield health
        yield GaugeMetricFamily(
            "grpcmux_server_sessions", "Open yamux sessions with clients (admitted or not).",
            value=len(connections))
        yield GaugeMetricFamily(
            "grpcmux_server_streams", "Open yamux streams over all client sessions.",
            value=sum(connection.open_streams() for connection in connections))
        sessions = [connection.session for connection in connections]
        yield CounterMetricFamily(
            "grpcmux_server_received_bytes", "Bytes received from clients.",
            value=self.closed_in + sum(s.bytes_received for s in sessions))
        yield CounterMetricFamily(
            "grpcmux_server_sent_bytes", "Bytes sent to clients.",
            value=self.closed_out + sum(s.bytes_sent for s in sessions))
        router = self.proxy.router if self.proxy is not None else None
        yield GaugeMetricFamily(
            "grpcmux_proxy_open_calls", "Calls in progress through the proxy endpoint.",
            value=len(router.calls) if router is not None else 0)
        yield GaugeMetricFamily(
            "grpcmux_proxy_caller_connections", "HTTP/2 connections of callers.",
            value=len(router.callers) if router is not None else 0)
        yield GaugeMetricFamily(
            "grpcmux_proxy_upstream_connections",
            "HTTP/2 connections from the proxy to clients and its own services.",
            value=router.upstream_connections() if router is not None else 0)


class ClientMetrics:
    """The multiplexer client's metrics; ``track(tunnel)`` makes its live state visible."""

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.handshakes = _handshakes("grpcmux_client", self.registry)
        self.reconnects = Counter(
            "grpcmux_client_reconnects",
            "Sessions with the multiplexer after the first one.", registry=self.registry)
        self.streams_spliced = Counter(
            "grpcmux_client_streams_spliced",
            "Streams from the server joined to a connection to the gRPC server.",
            registry=self.registry)
        self.backend_connect_failures = Counter(
            "grpcmux_client_backend_connect_failures",
            "Failed connections to the local gRPC server.", registry=self.registry)
        self._live = _ClientCollector()
        self.registry.register(self._live)

    def track(self, tunnel):
        self._live.tunnel = tunnel

    def handshake(self, outcome, reason=""):
        self.handshakes.labels(outcome=outcome, reason=reason).inc()


class _ClientCollector:
    def __init__(self):
        self.tunnel = None

    def describe(self):
        return []

    def collect(self):
        connected = self.tunnel is not None and self.tunnel.session is not None
        yield GaugeMetricFamily(
            "grpcmux_client_connected", "1 while the server has admitted this client.",
            value=int(connected))
        checker = getattr(self.tunnel, "backend_health", None)
        if checker is not None:
            health = GaugeMetricFamily(
                "grpcmux_client_backend_health",
                "1 for the health of the gRPC server as this client last checked it.",
                labels=["health"])
            for value in HEALTH_VALUES:
                health.add_metric([value], int(checker.health == value))
            yield health
