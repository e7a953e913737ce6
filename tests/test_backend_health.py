"""Backend health, unit level: the HTTP/2 health checker against a scripted server
(StringTransport, task.Clock), the server's rate-limited reports, and what the
registry, Discovery, metrics and the proxy make of them."""

import struct

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.backend_health import (
    CHECK,
    PROXY_ERROR,
    WATCH,
    BackendHealthChecker,
    ReportedHealth,
    record_health,
)
from grpcmux.handshake import (
    MAGIC,
    ClientHello,
    NativeClientHandshake,
    ServerHandshake,
    encode_message,
)
from grpcmux.http2.frames import (
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    PREFACE,
    SETTINGS_GRPCMUX_PROXY,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    TYPE_CONTINUATION,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_RST_STREAM,
    TYPE_SETTINGS,
    TYPE_WINDOW_UPDATE,
    frame_header,
    parse_frame_header,
)
from grpcmux.metrics import ClientMetrics, ServerMetrics
from grpcmux.registry import (
    CONNECTED,
    NOT_SERVING,
    SERVING,
    UNKNOWN,
    UPDATED,
    ClientInfo,
    ClientRegistry,
)
from grpcmux.config import ServerSettings
from grpcmux.rpc.discovery import AsyncDiscoveryServicer, server_details
from grpcmux.server import MultiplexerServer

ADDRESS = "127.0.0.1:50051"
Status = health_pb2.HealthCheckResponse.ServingStatus
Report = tunnel_pb2.BackendHealth


def frame(frame_type, flags, stream_id, payload=b""):
    return frame_header(len(payload), frame_type, flags, stream_id) + payload


def settings(values=None):
    payload = b"".join(struct.pack(">HL", k, v) for k, v in (values or {}).items())
    return frame(TYPE_SETTINGS, 0, 0, payload)


class Conn:
    """The gRPC server's side of one checker connection, scripted by the test."""

    def __init__(self, protocol):
        self.protocol = protocol
        self.transport = StringTransport()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._read = 0
        protocol.makeConnection(self.transport)
        if self.transport.value().startswith(PREFACE):
            self._read = len(PREFACE)

    def frames(self):
        """Frames the checker wrote since the last call: (type, flags, id, payload)."""
        data = self.transport.value()
        out = []
        while len(data) - self._read >= 9:
            length, frame_type, flags, stream_id = parse_frame_header(data, self._read)
            payload = data[self._read + 9:self._read + 9 + length]
            self._read += 9 + length
            if frame_type == TYPE_HEADERS:
                payload = dict(self.decoder.decode(payload))
            out.append((frame_type, flags, stream_id, payload))
        return out

    def send(self, *frames):
        self.protocol.dataReceived(b"".join(frames))

    def headers(self, stream_id, fields, end_stream=False):
        flags = FLAG_END_HEADERS | (FLAG_END_STREAM if end_stream else 0)
        return frame(TYPE_HEADERS, flags, stream_id, self.encoder.encode(fields))

    def answer(self, stream_id, *statuses, end=True):
        self.send(self.answer_bytes(stream_id, *statuses, end=end))

    def answer_bytes(self, stream_id, *statuses, end=True):
        """Response headers, one HealthCheckResponse per status, then OK trailers."""
        out = [self.headers(stream_id, [(":status", "200"),
                                        ("content-type", "application/grpc")])]
        for status in statuses:
            body = health_pb2.HealthCheckResponse(status=status).SerializeToString()
            out.append(frame(TYPE_DATA, 0, stream_id, struct.pack(">BL", 0, len(body)) + body))
        if end:
            out.append(self.headers(stream_id, [("grpc-status", "0")], end_stream=True))
        return b"".join(out)

    def status_only(self, stream_id, code, message=""):
        self.send(self.headers(stream_id, [(":status", "200"), ("grpc-status", str(code)),
                                           ("grpc-message", message)], end_stream=True))

    def lose(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Connects to a scripted ``Conn``, or refuses while ``refuse`` is set."""

    def __init__(self):
        self.conns = []
        self.refuse = False
        self.hold = False  # leave the connect pending
        self.pending = []

    def connect(self, factory):
        if self.refuse:
            return fail(ConnectionRefusedError("connection refused"))
        if self.hold:
            d = Deferred()
            self.pending.append(d)
            return d
        protocol = factory.buildProtocol(None)
        self.conns.append(Conn(protocol))
        return succeed(protocol)

    @property
    def last(self):
        return self.conns[-1]


class Control:
    """Stands in for the welcomed control stream: records the reports."""

    def __init__(self):
        self.reports = []

    def report_backend_health(self, status, detail=""):
        self.reports.append((status, detail))


def make_checker(interval=5.0, timeout=3.0):
    clock, endpoint = Clock(), Endpoint()
    checker = BackendHealthChecker(clock, endpoint, ADDRESS, interval=interval, timeout=timeout)
    return checker, clock, endpoint


def kinds(frames):
    return [f[0] for f in frames]


def started_serving(watch=True):
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.frames()
    conn.answer(1, Status.Value("SERVING"))
    if watch:
        conn.answer(3, Status.Value("SERVING"), end=False)
    conn.frames()
    return checker, clock, endpoint, conn


# the checker's HTTP/2


def test_waits_for_the_servers_settings_then_acks_and_checks():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    first = conn.frames()
    assert kinds(first) == [TYPE_SETTINGS]  # nothing else before the server's SETTINGS
    assert first[0][1] == 0
    conn.send(settings({SETTINGS_MAX_CONCURRENT_STREAMS: 100}))
    written = conn.frames()
    assert kinds(written) == [TYPE_SETTINGS, TYPE_HEADERS, TYPE_DATA]
    assert written[0][1] == FLAG_ACK
    _, flags, stream_id, fields = written[1]
    assert (flags, stream_id) == (FLAG_END_HEADERS, 1)
    assert fields[":method"] == "POST" and fields[":path"] == CHECK
    assert fields["content-type"] == "application/grpc" and fields["te"] == "trailers"
    assert fields["grpc-timeout"] == "3000m" and fields[":authority"] == ADDRESS
    assert written[2][1:] == (FLAG_END_STREAM, 1, b"\x00\x00\x00\x00\x00")
    assert checker.health == UNKNOWN
    checker.stopService()


def test_serving_then_watch_reports_a_change_at_once():
    checker, clock, endpoint = make_checker()
    control = Control()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.frames()
    conn.answer(1, Status.Value("SERVING"))
    assert checker.health == SERVING
    watch = [f for f in conn.frames() if f[0] == TYPE_HEADERS]
    assert [(f[2], f[3][":path"]) for f in watch] == [(3, WATCH)]
    assert "grpc-timeout" not in watch[0][3]
    checker.welcomed("welcome", control)
    assert control.reports == [(Report.STATUS_SERVING, "health status SERVING")]
    conn.answer(3, Status.Value("SERVING"), Status.Value("NOT_SERVING"), end=False)
    assert checker.health == NOT_SERVING
    assert control.reports[-1] == (Report.STATUS_NOT_SERVING, "health status NOT_SERVING")
    conn.answer(3, Status.Value("SERVING"), end=False)
    assert checker.health == SERVING and len(control.reports) == 3
    checker.stopService()


def test_health_observers_see_each_change_until_removed():
    checker, clock, endpoint = make_checker()
    seen = []
    remove = checker.add_health_observer(lambda health, detail: seen.append((health, detail)))
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.answer(1, Status.Value("SERVING"))
    conn.answer(3, Status.Value("SERVING"), Status.Value("SERVING"), end=False)  # no change
    assert seen == [(SERVING, "health status SERVING")]
    remove()
    conn.answer(3, Status.Value("NOT_SERVING"), end=False)
    assert checker.health == NOT_SERVING and len(seen) == 1
    checker.stopService()


def test_checks_again_every_interval_on_the_same_connection():
    checker, clock, endpoint, conn = started_serving()
    clock.advance(5.0)
    headers = [f for f in conn.frames() if f[0] == TYPE_HEADERS]
    assert [(f[2], f[3][":path"]) for f in headers] == [(5, CHECK)]
    conn.answer(5, Status.Value("SERVICE_UNKNOWN"))
    assert checker.health == NOT_SERVING
    assert len(endpoint.conns) == 1
    checker.stopService()


def test_a_server_without_the_health_service_serves_while_it_answers():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.frames()
    conn.status_only(1, grpc.StatusCode.UNIMPLEMENTED.value[0], "unknown service")
    assert checker.health == SERVING
    assert "no health service" in checker.detail
    assert TYPE_HEADERS not in kinds(conn.frames())  # no Watch either
    checker.stopService()


def test_watch_unimplemented_leaves_check_alone():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.answer(1, Status.Value("SERVING"))
    conn.status_only(3, grpc.StatusCode.UNIMPLEMENTED.value[0])
    conn.frames()
    clock.advance(5.0)
    assert [f[3][":path"] for f in conn.frames() if f[0] == TYPE_HEADERS] == [CHECK]
    conn.answer(5, Status.Value("SERVING"))
    assert [f for f in conn.frames() if f[0] == TYPE_HEADERS] == []  # no Watch again
    assert checker.health == SERVING
    checker.stopService()


def test_another_status_from_check_is_down():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.status_only(1, grpc.StatusCode.INTERNAL.value[0], "boom")
    assert checker.health == NOT_SERVING
    assert checker.detail == "health check failed: code 13: boom"
    checker.stopService()


def test_connection_refused_is_down_and_retried_each_interval():
    checker, clock, endpoint = make_checker()
    endpoint.refuse = True
    checker.startService()
    assert checker.health == NOT_SERVING
    assert checker.detail.startswith("cannot connect: ")
    endpoint.refuse = False
    clock.advance(5.0)
    endpoint.last.send(settings())
    endpoint.last.answer(1, Status.Value("SERVING"))
    assert checker.health == SERVING
    checker.stopService()


def test_no_answer_to_check_is_down_and_drops_the_connection():
    checker, clock, endpoint, conn = started_serving(watch=False)
    clock.advance(5.0)
    clock.advance(3.0)
    assert checker.health == NOT_SERVING
    assert checker.detail == "no answer to a health check within 3 s"
    assert conn.transport.disconnected
    conn.lose()  # the drop completes; nothing more is decided from it
    assert len(endpoint.conns) == 1
    clock.advance(2.0)  # the next tick connects again
    assert len(endpoint.conns) == 2
    checker.stopService()


def test_stop_while_connecting_reports_nothing():
    checker, clock, endpoint = make_checker()
    endpoint.hold = True
    control = Control()
    checker.welcomed("welcome", control)
    checker.startService()
    checker.stopService()
    assert endpoint.pending[0].called  # cancelled
    endpoint.pending[0].addErrback(lambda _: None)
    assert (checker.health, control.reports) == (UNKNOWN, [])
    assert clock.getDelayedCalls() == []


def test_no_settings_in_time_is_down():
    checker, clock, endpoint = make_checker()
    endpoint.hold = True
    checker.startService()
    clock.advance(3.0)
    assert checker.health == NOT_SERVING
    assert checker.detail == "no HTTP/2 settings within 3 s"
    assert endpoint.pending[0].called  # the attempt was cancelled
    endpoint.pending[0].addErrback(lambda _: None)
    checker.stopService()


def test_a_long_lived_connection_that_ends_is_retried_at_once():
    checker, clock, endpoint, conn = started_serving()
    clock.advance(5.0)
    conn.answer(5, Status.Value("SERVING"))
    endpoint.refuse = True
    conn.lose()  # the gRPC server stopped
    assert checker.health == NOT_SERVING  # found at once, not at the next tick
    assert checker.detail.startswith("cannot connect")
    checker.stopService()


def test_a_short_lived_connection_is_down_and_not_retried_in_a_loop():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    conn.lose()
    assert checker.health == NOT_SERVING
    assert checker.detail == "the gRPC server closed the connection"
    assert len(endpoint.conns) == 1
    clock.advance(5.0)
    assert len(endpoint.conns) == 2
    checker.stopService()


def test_not_http2_is_down():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert conn.transport.disconnected
    conn.lose()
    assert checker.health == NOT_SERVING
    assert checker.detail == "it does not answer as an HTTP/2 (gRPC) server"
    checker.stopService()


def test_an_answer_read_one_byte_at_a_time():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    data = settings() + conn.answer_bytes(1, Status.Value("NOT_SERVING"))
    for i in range(len(data)):
        conn.send(data[i:i + 1])
    assert (checker.health, checker.detail) == (NOT_SERVING, "health status NOT_SERVING")
    checker.stopService()


def test_pings_are_answered_and_data_gives_window_back():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings(), frame(TYPE_PING, 0, 0, b"12345678"))
    assert (TYPE_PING, FLAG_ACK, 0, b"12345678") in conn.frames()
    conn.answer(1, Status.Value("SERVING"))
    updates = [f for f in conn.frames() if f[0] == TYPE_WINDOW_UPDATE]
    assert (TYPE_WINDOW_UPDATE, 0, 0, struct.pack(">L", 7)) in updates
    checker.stopService()


def test_padded_headers_and_continuation_are_read():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings())
    block = conn.encoder.encode([(":status", "200"), ("grpc-status", "12")])
    padded = bytes([3]) + block[:2] + b"\x00\x00\x00"
    conn.send(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_END_STREAM, 1, padded),
              frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, block[2:]))
    assert checker.health == SERVING
    checker.stopService()


def test_an_interrupted_header_block_drops_the_connection():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings(), frame(TYPE_HEADERS, 0, 1, b"\x88"), frame(TYPE_PING, 0, 0, b"x" * 8))
    assert conn.transport.disconnected
    conn.lose()
    assert checker.detail == "HTTP/2 protocol error: a header block was interrupted"
    checker.stopService()


def test_an_oversized_header_block_drops_the_connection():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings(), frame(TYPE_HEADERS, 0, 1, b"\x00" * 16000))
    for _ in range(2):
        conn.send(frame(TYPE_CONTINUATION, 0, 1, b"\x00" * 16000))
    assert conn.transport.disconnected
    conn.lose()
    assert checker.detail == "HTTP/2 protocol error: header block too large"
    checker.stopService()


def test_goaway_and_reset_streams():
    checker, clock, endpoint = make_checker()
    checker.startService()
    conn = endpoint.last
    conn.send(settings(), frame(TYPE_RST_STREAM, 0, 1, struct.pack(">L", 2)))
    assert checker.health == NOT_SERVING
    assert "stream reset" in checker.detail
    conn.send(frame(TYPE_GOAWAY, 0, 0, struct.pack(">LL", 0, 0)))
    assert conn.transport.disconnected
    conn.lose()
    assert checker.detail == "the gRPC server closed the connection (GOAWAY)"
    checker.stopService()


def test_stop_closes_the_connection_and_leaves_no_timers():
    checker, clock, endpoint, conn = started_serving()
    stopped = checker.stopService()
    assert conn.transport.disconnected and not stopped.called
    conn.lose()
    assert stopped.called
    assert clock.getDelayedCalls() == []


# a grpcmux proxy endpoint as the gRPC server


def test_a_proxy_endpoint_is_refused_with_one_clear_line(log_events):
    checker, clock, endpoint = make_checker()
    checker.startService()
    guarded = checker.guard(endpoint)
    conn = endpoint.last
    conn.frames()
    conn.send(settings({SETTINGS_MAX_CONCURRENT_STREAMS: 100, SETTINGS_GRPCMUX_PROXY: 1}))
    assert conn.frames() == []  # not even a SETTINGS ACK: no call ever goes there
    assert conn.transport.disconnected
    assert checker.is_proxy and checker.health == NOT_SERVING
    failed = []
    guarded.connect(Factory.forProtocol(Protocol)).addErrback(failed.append)
    assert failed[0].check(ConnectError)
    assert PROXY_ERROR.format(address=ADDRESS) in str(failed[0].value)
    for _ in range(3):  # still a proxy at every check: no new line
        clock.advance(5.0)
        endpoint.last.send(settings({SETTINGS_GRPCMUX_PROXY: 1}))
    lines = [e for e in log_events if e.get("log_format") == PROXY_ERROR]
    assert len(lines) == 1
    assert lines[0]["log_level"].name == "error"
    assert (
        "the gRPC server at 127.0.0.1:50051 is a grpcmux proxy endpoint; "
        "point --grpc-server-address at your gRPC server"
    ) == PROXY_ERROR.format(address=lines[0]["address"])
    warnings = [e for e in log_events if e.get("log_level") and e["log_level"].name == "warn"
                and e.get("log_namespace", "").startswith("grpcmux.backend_health")]
    assert warnings == []  # the error line says it all
    clock.advance(5.0)  # a real gRPC server answers there now
    endpoint.last.send(settings())
    assert not checker.is_proxy
    assert len(endpoint.conns) == 5
    guarded.connect(Factory.forProtocol(Protocol))
    assert len(endpoint.conns) == 6
    checker.stopService()


def test_the_first_check_decides_before_a_stream_connects():
    checker, clock, endpoint = make_checker()
    checker.startService()
    guarded = checker.guard(endpoint)
    connected = guarded.connect(Factory.forProtocol(Protocol))
    assert not connected.called and len(endpoint.conns) == 1
    endpoint.last.send(settings())
    assert connected.called and len(endpoint.conns) == 2
    checker.stopService()


def test_a_stream_that_gives_up_while_waiting_leaves_no_waiter():
    checker, clock, endpoint = make_checker()
    checker.startService()
    waiting = checker.guard(endpoint).connect(Factory.forProtocol(Protocol))
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    endpoint.last.send(settings())  # deciding now fires nothing twice
    checker.stopService()


def test_guard_passes_through_when_not_running():
    checker, clock, endpoint = make_checker()
    checker.guard(endpoint).connect(Factory.forProtocol(Protocol))
    assert len(endpoint.conns) == 1


# the control stream


def test_reports_travel_on_the_control_stream_after_the_welcome():
    client = NativeClientHandshake(ClientHello("edge", "native"))
    client.makeConnection(StringTransport())
    client.transport.clear()
    client.report_backend_health(Report.STATUS_SERVING)  # before the Welcome: nothing
    assert client.transport.value() == b""
    welcome = tunnel_pb2.ServerMessage(welcome=tunnel_pb2.Welcome())
    client.dataReceived(encode_message(welcome))
    client.report_backend_health(Report.STATUS_NOT_SERVING, "refused")
    received = []
    server = ServerHandshake(lambda h, hello: None, lambda h, reason: received.append(reason),
                             None, on_message=received.append)
    server.makeConnection(StringTransport())
    server.dataReceived(MAGIC + encode_message(tunnel_pb2.Hello(client_id="edge")))
    server.dataReceived(client.transport.value())  # not yet accepted: ignored
    assert received == []
    server.accept(tunnel_pb2.Welcome())
    data = client.transport.value()
    server.dataReceived(data[:3])
    server.dataReceived(data[3:])
    assert [m.backend_health for m in received] == [
        Report(status=Report.STATUS_NOT_SERVING, detail="refused")]


def test_a_garbled_control_message_fails_the_connection():
    failures = []
    server = ServerHandshake(lambda h, hello: None, lambda h, reason: failures.append(reason),
                             None)
    server.makeConnection(StringTransport())
    server.dataReceived(MAGIC + encode_message(tunnel_pb2.Hello(client_id="edge")))
    server.accept(tunnel_pb2.Welcome())
    server.dataReceived(struct.pack(">I", 2) + b"\xff\xff")
    assert failures == ["control stream: a message is not valid protobuf"]


def health_message(status, detail=""):
    return tunnel_pb2.ClientMessage(backend_health=Report(status=status, detail=detail))


def test_reports_are_applied_at_most_once_a_second_the_latest_winning():
    clock, applied = Clock(), []
    reports = ReportedHealth(clock, lambda health, detail: applied.append((health, detail)))
    reports.received(health_message(Report.STATUS_SERVING))
    assert applied == [(SERVING, "")]
    for status in (Report.STATUS_NOT_SERVING, Report.STATUS_SERVING, Report.STATUS_NOT_SERVING):
        reports.received(health_message(status, "x" * 500))
    assert len(applied) == 1
    clock.advance(1.0)
    assert applied[1] == (NOT_SERVING, "x" * 200)  # the latest, detail capped
    reports.received(health_message(Report.STATUS_SERVING))
    reports.stop()
    assert clock.getDelayedCalls() == []
    reports.received(tunnel_pb2.ClientMessage())  # a kind unknown here: ignored
    assert len(applied) == 2


def test_an_unknown_status_counts_as_unknown():
    clock, applied = Clock(), []
    reports = ReportedHealth(clock, lambda health, detail: applied.append(health))
    reports.received(health_message(7))
    assert applied == [UNKNOWN]


# what the server makes of it


def info(client_id="edge", **fields):
    return ClientInfo(client_id=client_id, connected_at=0.0, remote_address="1.2.3.4:5",
                      wire_protocol="native", **fields)


def test_registry_update_tells_only_the_observers_of_updates():
    registry = ClientRegistry()
    plain, updates = [], []
    registry.subscribe(plain.append)
    registry.subscribe(lambda e: updates.append((e, registry.snapshot[e.info.client_id])),
                       updates=True)
    registry.add(info())
    assert registry.get("edge").health == UNKNOWN
    new = registry.update("edge", health=SERVING)
    assert new == info(health=SERVING) and registry.snapshot["edge"] == new
    assert registry.update("edge", health=SERVING) == new  # no change: no event
    assert registry.update("gone", health=SERVING) is None
    assert [e.kind for e in plain] == [CONNECTED]
    assert [(e.kind, snap.health) for e, snap in updates] == [(CONNECTED, UNKNOWN),
                                                              (UPDATED, SERVING)]
    with pytest.raises(ValueError):
        registry.update("edge", health="fine")
    with pytest.raises(ValueError):
        info(health="up")


def test_record_health_logs_changes_only(log_events):
    registry = ClientRegistry()
    registry.add(info())
    record_health(registry, "edge", NOT_SERVING, "refused")
    record_health(registry, "edge", NOT_SERVING, "refused again")
    record_health(registry, "gone", SERVING, "")
    assert registry.get("edge").health == NOT_SERVING
    lines = [e for e in log_events if e.get("log_namespace") == "grpcmux.backend_health"]
    assert [e["log_format"] for e in lines] == [
        "client {client_id} reports its gRPC server down: {detail!r}"]


def test_only_the_current_connection_of_an_id_reports():
    registry = ClientRegistry()
    registry.add(info())
    server = MultiplexerServer(Clock(), registry, ServerSettings())

    class Connection:
        client_id = "edge"

    current, replaced = Connection(), Connection()
    server.clients.list(current)
    server.health_reported(replaced, NOT_SERVING, "a late word from a replaced session")
    assert registry.get("edge").health == UNKNOWN
    server.health_reported(current, NOT_SERVING, "refused")
    assert registry.get("edge").health == NOT_SERVING


def test_discovery_shows_health_and_watchers_of_updates_see_changes():
    registry = ClientRegistry()
    registry.add(info())
    assert server_details(registry.get("edge")).health == discovery_pb2.GRPCServer.HEALTH_UNKNOWN
    plain, updates = [], []
    registry.subscribe(plain.append)
    registry.subscribe(updates.append, updates=True)
    registry.update("edge", health=NOT_SERVING)
    assert plain == []
    assert [(e.kind, e.info.health) for e in updates] == [(UPDATED, NOT_SERVING)]
    # A Watch that did not ask for updates is not sent them.
    batch = [(e.kind, e.info) for e in updates]
    everyone = lambda client_id: True  # noqa: E731
    assert AsyncDiscoveryServicer.responses(batch, everyone, False) == []
    sent = AsyncDiscoveryServicer.responses(batch, everyone, True)
    assert [r.event for r in sent] == [discovery_pb2.WatchGRPCServerResponse.EVENT_UPDATED]
    details = server_details(registry.get("edge"))
    assert details.health == discovery_pb2.GRPCServer.HEALTH_NOT_SERVING


def test_metrics_carry_health():
    class Server:
        registry = ClientRegistry()
        connections = ()

    metrics = ServerMetrics()
    metrics.track(Server)
    Server.registry.add(info("a", health=SERVING))
    Server.registry.add(info("b", health=NOT_SERVING))
    Server.registry.add(info("c"))
    text = generate_latest(metrics.registry).decode()
    assert 'grpcmux_server_client_backend_health{health="serving"} 1.0' in text
    assert 'grpcmux_server_client_backend_health{health="not_serving"} 1.0' in text
    assert 'grpcmux_server_client_backend_health{health="unknown"} 1.0' in text

    class Tunnel:
        session = None
        backend_health = BackendHealthChecker(Clock(), Endpoint(), ADDRESS)

    client = ClientMetrics()
    client.track(Tunnel)
    text = generate_latest(client.registry).decode()
    assert 'grpcmux_client_backend_health{health="unknown"} 1.0' in text
    assert 'grpcmux_client_backend_health{health="serving"} 0.0' in text
