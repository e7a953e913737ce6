"""Prometheus metrics for the server and the client, served over HTTP at /metrics.

Each service graph owns its own ``CollectorRegistry`` (never the global default),
so a process, or a test, can hold many.  Live state (clients, sessions, streams,
bytes) is read at scrape time by a collector; events (handshakes, calls, reconnects)
are counted with one increment where they happen.

``MetricsResource`` renders on the reactor's thread pool, so the collectors only
take atomic reads of reactor-owned state: the registry's immutable snapshot, a
``tuple()`` copy of a set, ``len()`` of a set, plain integers.
"""


from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.addresses import server_endpoint

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

    def __init__(self, reactor, listener, registry):
        self._reactor = reactor
        self.listener = listener
        self.registry = registry
        self.port = None

    def startService(self):
        # Imported here: prometheus_client.twisted imports the global reactor.
        from prometheus_client.twisted import MetricsResource

        root = _Root()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.noisy = False
        outcome = []
        server_endpoint(self._reactor, self.listener).listen(site).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"metrics listener {self.listener!r} did not listen at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        super().startService()
        address = self.port.getHost()
        self._log.info("metrics on http://{host}:{port}/metrics",
                       host=getattr(address, "host", address), port=getattr(address, "port", ""))

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _Root(Resource):
    """Only /metrics exists; anything else is a plain 404."""

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


class ServerMetrics:
    """The multiplexer server's metrics; ``track(server)`` makes its live state visible."""

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
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
        self._live = _ServerCollector()
        self.registry.register(self._live)

    def track(self, server):
        """Report the connections of ``server`` (a MultiplexerServer) from now on."""
        self._live.server = server

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
        """Record one call through the proxy endpoint (the router calls it once per call)."""
        self.calls.labels(code=code_name, client=client).inc()
        self.call_seconds.observe(seconds)
        if bytes_in:
            self.call_bytes.labels(direction="received").inc(bytes_in)
        if bytes_out:
            self.call_bytes.labels(direction="sent").inc(bytes_out)


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
        connections = tuple(server._connections) if server is not None else ()
        clients = GaugeMetricFamily(
            "grpcmux_server_connected_clients", "Admitted clients by wire protocol.",
            labels=["wire_protocol"])
        by_protocol = dict.fromkeys(_WIRE_PROTOCOLS, 0)
        for info in snapshot.values():
            by_protocol[info.wire_protocol] = by_protocol.get(info.wire_protocol, 0) + 1
        for protocol, count in sorted(by_protocol.items()):
            clients.add_metric([protocol], count)
        yield clients
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
