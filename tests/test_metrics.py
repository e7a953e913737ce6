"""Prometheus metrics: scraped over HTTP from a whole stack on loopback, plus units."""

import grpc
import pytest
import pytest_twisted
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.web.client import Agent, readBody

from grpcmux.accepting import SessionFactory
from grpcmux.tap import client as client_tap
from grpcmux.config import ClientSettings, ConfigError, ServerSettings
from grpcmux.listening import StartupError
from grpcmux.metrics import ClientMetrics, MetricsService, ServerMetrics, reject_reason
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer
from grpcmux.tap.server import make_service
from mux_stack import TIMEOUT, first_report
from rpc_backend import route

LOOPBACK = "tcp:0:interface=127.0.0.1"
# Twisted's own Agent response transport trips readBody's abortConnection check.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


async def scrape(reactor, service):
    """GET /metrics over HTTP; {(name, labels...): value} of every sample."""
    url = f"http://127.0.0.1:{service.port.getHost().port}/metrics".encode()
    response = await Agent(reactor).request(b"GET", url).addTimeout(TIMEOUT, reactor)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    body = await readBody(response).addTimeout(TIMEOUT, reactor)
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name,) + tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def serve(reactor, metrics):
    service = MetricsService(reactor, LOOPBACK, metrics.registry)
    service.startService()
    return service


@pytest_twisted.async_yield_fixture
async def metered(reactor, tmp_path):
    """A stack whose server reports to ``metered.server_metrics``, served over HTTP."""
    from mux_stack import Stack

    metrics = ServerMetrics()
    stack = Stack(reactor, tmp_path, proxy_kwargs={"observer": metrics.call_finished},
                  metrics=metrics)
    metrics.track_proxy(stack.proxy)
    stack.http = serve(reactor, metrics)
    stack.server_metrics = metrics
    stack.services = [stack.http]
    yield stack
    for client in stack.clients:
        client.shutdown_grace = 0.1  # the proxy's idle connections need no grace
    await stack.stop()
    for service in stack.services:
        await service.stopService()


def watch_client(stack, service):
    http = serve(stack.reactor, service.tunnel.metrics)
    stack.services.append(http)
    return http


CONNECTED_NATIVE = ("grpcmux_server_connected_clients", ("wire_protocol", "native"))
CONNECTED_LEGACY = ("grpcmux_server_connected_clients", ("wire_protocol", "legacy"))
SESSIONS = ("grpcmux_server_sessions",)
STREAMS = ("grpcmux_server_streams",)
BYTES_IN = ("grpcmux_server_received_bytes_total",)
BYTES_OUT = ("grpcmux_server_sent_bytes_total",)
CALLS_OK = ("grpcmux_proxy_calls_total", ("client", "lab"), ("code", "OK"))
UPSTREAMS = ("grpcmux_proxy_upstream_connections",)


def handshakes(role, outcome, reason=""):
    return (f"grpcmux_{role}_handshakes_total", ("outcome", outcome), ("reason", reason))


@pytest_twisted.ensureDeferred
async def test_server_metrics_follow_clients_and_their_traffic(metered):
    reactor = metered.reactor
    before = await scrape(reactor, metered.http)
    assert before[CONNECTED_NATIVE] == before[CONNECTED_LEGACY] == 0
    assert before[SESSIONS] == before[STREAMS] == 0
    assert before[BYTES_IN] == before[BYTES_OUT] == 0

    await metered.connected_client("lab")
    await metered.connected_client("old", wire_protocol="legacy")
    result = await metered.invoke("Unary", b"x" * 100_000, route("lab"))
    assert result.responses == [b"x" * 100_000]
    during = await scrape(reactor, metered.http)
    assert during[CONNECTED_NATIVE] == during[CONNECTED_LEGACY] == 1
    assert during[SESSIONS] == 2
    assert during[STREAMS] >= 2  # a control stream each, plus the proxy's connection
    assert during[handshakes("server", "accepted")] == 2
    assert during[BYTES_IN] > 100_000 and during[BYTES_OUT] > 100_000
    assert during[CALLS_OK] == 1
    assert during[("grpcmux_proxy_call_bytes_total", ("direction", "received"))] > 100_000
    assert during[("grpcmux_proxy_call_bytes_total", ("direction", "sent"))] > 100_000
    assert during[UPSTREAMS] == 1  # the router keeps its connection to the client
    assert during[("grpcmux_proxy_open_calls",)] == 0

    for client in metered.clients:
        client.shutdown_grace = 0.1
        await client.stopService()
    after = await scrape(reactor, metered.http)
    assert after[CONNECTED_NATIVE] == after[CONNECTED_LEGACY] == 0
    assert after[SESSIONS] == after[STREAMS] == 0
    # Counters keep what closed sessions carried.
    assert after[BYTES_IN] >= during[BYTES_IN] and after[BYTES_OUT] >= during[BYTES_OUT]


@pytest_twisted.ensureDeferred
async def test_proxied_calls_by_status_code_and_latency(metered):
    await metered.connected_client("lab")
    assert (await metered.invoke("Unary", b"a", route("lab"))).code == grpc.StatusCode.OK
    failing = route("lab") + (("x-fail", "PERMISSION_DENIED not you"),)
    denied = await metered.invoke("Bidi", [b"b"], failing)
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    unrouted = await metered.invoke("Unary", b"c", route("nobody"))
    assert unrouted.code == grpc.StatusCode.NOT_FOUND  # no such client
    samples = await scrape(metered.reactor, metered.http)
    assert samples[CALLS_OK] == 1
    assert samples[("grpcmux_proxy_calls_total", ("client", "lab"),
                    ("code", "PERMISSION_DENIED"))] == 1
    # Refused before any client was chosen: no per-client label for made-up ids.
    assert samples[("grpcmux_proxy_calls_total", ("client", ""), ("code", "NOT_FOUND"))] == 1
    assert samples[("grpcmux_proxy_call_duration_seconds_count",)] == 3
    assert samples[("grpcmux_proxy_call_duration_seconds_sum",)] > 0


@pytest_twisted.ensureDeferred
async def test_refusals_count_on_both_sides(metered):
    await metered.connected_client("twin")
    second = metered.client("twin")
    second_http = watch_client(metered, second)
    await first_report(second)
    server = await scrape(metered.reactor, metered.http)
    assert server[handshakes("server", "rejected", "already_exists")] >= 1
    assert server[handshakes("server", "accepted")] == 1
    client = await scrape(metered.reactor, second_http)
    assert client[handshakes("client", "rejected", "already_exists")] >= 1
    assert client[("grpcmux_client_connected",)] == 0


@pytest_twisted.ensureDeferred
async def test_client_counts_a_reconnect_after_the_server_restarts(metered):
    client = await metered.connected_client("lab")
    http = watch_client(metered, client)
    assert (await metered.invoke("Unary", b"a", route("lab"))).responses == [b"a"]
    first = await scrape(metered.reactor, http)
    assert first[("grpcmux_client_connected",)] == 1
    assert first[("grpcmux_client_reconnects_total",)] == 0
    assert first[("grpcmux_client_streams_spliced_total",)] >= 1
    assert first[handshakes("client", "accepted")] == 1

    session = client.tunnel.session
    await metered.restart_server()
    await session.when_closed().addTimeout(TIMEOUT, metered.reactor)
    await metered.registered("lab")  # by the next session: the client saw the old one end
    assert await metered.admitted(client) is not session
    again = await scrape(metered.reactor, http)
    assert again[("grpcmux_client_connected",)] == 1
    assert again[("grpcmux_client_reconnects_total",)] >= 1
    assert again[handshakes("client", "accepted")] == 2
    server = await scrape(metered.reactor, metered.http)
    assert server[handshakes("server", "accepted")] == 2
    assert server[CONNECTED_NATIVE] == 1


@pytest_twisted.ensureDeferred
async def test_client_counts_backend_connect_failures(metered, tmp_path):
    client = await metered.connected_client(
        "lost", backend_address=f"unix:{tmp_path / 'nobody.sock'}")
    http = watch_client(metered, client)
    result = await metered.invoke("Unary", b"a", route("lost"))
    assert result.code.name == "UNAVAILABLE"
    samples = await scrape(metered.reactor, http)
    assert samples[("grpcmux_client_backend_connect_failures_total",)] >= 1
    assert samples[("grpcmux_client_streams_spliced_total",)] == 0


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_not_found(reactor):
    http = serve(reactor, ClientMetrics())
    try:
        url = f"http://127.0.0.1:{http.port.getHost().port}/".encode()
        response = await Agent(reactor).request(b"GET", url).addTimeout(TIMEOUT, reactor)
        await readBody(response).addTimeout(TIMEOUT, reactor)
        assert response.code == 404
    finally:
        await http.stopService()


def test_metrics_service_fails_at_start_on_a_bad_listener(reactor):
    with pytest.raises(StartupError, match="^--metrics-listener tcp:notaport: cannot listen"):
        MetricsService(reactor, "tcp:notaport", CollectorRegistry()).startService()


@pytest_twisted.ensureDeferred
async def test_a_scrape_logs_nothing(reactor, log_events):
    http = serve(reactor, ServerMetrics())
    try:
        del log_events[:]
        await scrape(reactor, http)
        await scrape(reactor, http)
    finally:
        await http.stopService()
    assert [formatEvent(e) for e in log_events if "metrics" in formatEvent(e)] == []


# -- units: the server's handshake outcomes and byte counts on a fake clock ----------


def session_on_fake_clock(metrics):
    clock = task.Clock()
    server = MultiplexerServer(clock, ClientRegistry(), ServerSettings(
        multiplexer_listener=LOOPBACK, handshake_timeout=5.0), metrics=metrics)
    connection = SessionFactory(server).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 5555))
    session = connection.protocol  # behind the first bytes' check
    transport = StringTransport()
    connection.makeConnection(transport)
    return clock, server, session, transport


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0


def test_a_silent_client_times_out_once():
    metrics = ServerMetrics()
    clock, server, session, _ = session_on_fake_clock(metrics)
    clock.advance(5.0)
    assert value(metrics, "grpcmux_server_handshakes_total",
                 outcome="timed_out", reason="") == 1
    assert value(metrics, "grpcmux_server_handshakes_total", outcome="failed", reason="") == 0
    assert session.closed and not server.connections


def test_garbage_fails_the_handshake_and_its_bytes_are_counted():
    from grpcmux.yamux.frame import FLAG_SYN, TYPE_WINDOW_UPDATE, encode_header

    metrics = ServerMetrics()
    clock, server, session, transport = session_on_fake_clock(metrics)
    opening = encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
    data = encode_header(0, 0, 1, 4) + b"\x00BAD"  # native, but not the magic
    session.dataReceived(opening)
    clock.advance(0)
    assert session.bytes_sent == len(transport.value()) > 0  # the ACK
    session.dataReceived(data)
    assert session.bytes_received == len(opening + data)
    assert value(metrics, "grpcmux_server_handshakes_total", outcome="failed", reason="") == 1
    clock.advance(10)
    assert value(metrics, "grpcmux_server_handshakes_total", outcome="timed_out",
                 reason="") == 0
    assert value(metrics, "grpcmux_server_received_bytes_total") == len(opening + data)


def test_call_observer_records_code_and_latency():
    metrics = ServerMetrics()
    metrics.call_finished("lab", "OK", 0.002, 10, 20)
    metrics.call_finished("", "NOT_FOUND", 0.0, 0, 0)
    assert value(metrics, "grpcmux_proxy_calls_total", code="OK", client="lab") == 1
    assert value(metrics, "grpcmux_proxy_calls_total", code="NOT_FOUND", client="") == 1
    assert value(metrics, "grpcmux_proxy_call_duration_seconds_count") == 2
    assert value(metrics, "grpcmux_proxy_call_bytes_total", direction="received") == 10
    assert value(metrics, "grpcmux_proxy_call_bytes_total", direction="sent") == 20


def test_registries_are_per_service_graph():
    one, two = ServerMetrics(), ServerMetrics()
    one.handshake("accepted")
    assert value(one, "grpcmux_server_handshakes_total", outcome="accepted", reason="") == 1
    assert value(two, "grpcmux_server_handshakes_total", outcome="accepted", reason="") == 0
    ClientMetrics().reconnects.inc()
    ClientMetrics()  # a second one: no clash, as nothing goes to the global registry
    assert REGISTRY.get_sample_value("grpcmux_client_reconnects_total") is None


def test_reject_reason_names_the_code():
    assert reject_reason(2) == "already_exists"
    assert reject_reason(1) == "bad_client_id"
    assert reject_reason(999) == "999"


# -- settings and the service graph ------------------------------------------------------


def test_metrics_listener_is_off_by_default_and_checked():
    assert ServerSettings().metrics_listener is None
    assert ClientSettings().metrics_listener is None
    assert ServerSettings(metrics_listener="127.0.0.1:9102").metrics_listener
    assert ClientSettings(metrics_listener="tcp:9102").metrics_listener == "tcp:9102"
    with pytest.raises(ConfigError, match="metrics_listener"):
        ServerSettings(metrics_listener="no-port")


def test_make_service_adds_the_metrics_endpoint_only_when_asked(reactor):
    plain = make_service(ServerSettings(), reactor)
    assert plain.metrics_service is None
    with_metrics = make_service(
        ServerSettings(metrics_listener="127.0.0.1:9102"), reactor)
    http = with_metrics.getServiceNamed("metrics")
    assert http.registry is with_metrics.multiplexer.metrics.registry
    assert http.status is with_metrics.multiplexer.metrics  # the status page at /

    settings = ClientSettings(client_id="c", metrics_listener="tcp:9103")
    client = client_tap.make_service(settings, reactor)
    assert client.getServiceNamed("metrics").registry is client.tunnel.metrics.registry
    assert client.getServiceNamed("metrics").status is None
    with pytest.raises(KeyError):
        client_tap.make_service(ClientSettings(client_id="c"), reactor).getServiceNamed(
            "metrics")
