"""Tests for grpcmux.yamux.session (the checklist of hashicorp's session_test.go)."""

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from grpcmux.testing import (
    Frame,
    RecorderFactory,
    StreamRecorder,
    build_frame,
    connected_sessions,
    data_frame,
    go_away_frame,
    ping_frame,
    read_frames,
    session_on_string_transport,
    window_update,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.address import StreamAddress
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import (
    GoAwayReceived,
    GoAwaySent,
    PingTimeout,
    ProtocolError,
    RemoteGoAwayError,
    SessionClosed,
    StreamIdsExhausted,
    StreamOpenTimeout,
)
from grpcmux.yamux.session import YamuxFactory, YamuxSession

WU, DATA, PING, GO = f.TYPE_WINDOW_UPDATE, f.TYPE_DATA, f.TYPE_PING, f.TYPE_GO_AWAY
SYN, ACK, FIN, RST = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_FIN, f.FLAG_RST


def make(is_client=False, factory=None, **config):
    return session_on_string_transport(is_client, factory, YamuxConfig(**config) if config else None)


def closed_with(session):
    results = []
    session.when_closed().addCallback(results.append)
    return results


# -- roles, ids, open ---------------------------------------------------------

def test_registers_as_streaming_producer():
    session, transport, _ = make()
    assert transport.producer is session and transport.streaming


def test_client_opens_odd_ids_with_syn_on_window_update():
    session, transport, _ = make(is_client=True)
    streams = [session.open_stream(StreamRecorder()) for _ in range(3)]
    assert [s.stream_id for s in streams] == [1, 3, 5]
    assert read_frames(transport) == [Frame(WU, SYN, i, 0) for i in (1, 3, 5)]
    assert all(session.streams[s.stream_id] is s for s in streams)


def test_server_opens_even_ids():
    session, transport, _ = make(is_client=False)
    assert session.open_stream(StreamRecorder()).stream_id == 2
    assert session.open_stream(StreamRecorder()).stream_id == 4


def test_open_connects_protocol_and_data_may_follow_before_ack():
    session, transport, clock = make(is_client=True)
    proto = StreamRecorder()
    stream = session.open_stream(proto)
    assert proto.made and proto.transport is stream
    stream.write(b"early")
    clock.advance(0)
    assert read_frames(transport) == [Frame(WU, SYN, 1, 0), Frame(DATA, 0, 1, 5, b"early")]
    assert not stream.established
    session.dataReceived(window_update(1, 0, ACK))
    assert stream.established


def test_stream_ids_exhausted():
    session, _, _ = make(is_client=True)
    session.next_stream_id = 0xFFFFFFFD
    session.open_stream(StreamRecorder())
    with pytest.raises(StreamIdsExhausted):
        session.open_stream(StreamRecorder())


def test_large_window_advertised_with_syn_and_ack():
    window = 1024 * 1024
    factory = RecorderFactory()
    session, transport, _ = make(True, factory, max_stream_window_size=window)
    stream = session.open_stream(StreamRecorder())
    session.dataReceived(window_update(2, 0, SYN))
    assert read_frames(transport) == [Frame(WU, SYN, 1, window - f.INITIAL_STREAM_WINDOW),
                                      Frame(WU, ACK, 2, window - f.INITIAL_STREAM_WINDOW)]
    # The peer may now fill the whole large window at once.
    session.dataReceived(data_frame(1, b"a" * window, ACK))
    assert len(stream.protocol.data) == window and not session.closed


# -- accept -------------------------------------------------------------------

def test_accept_syn_on_window_update_acks_at_once():
    factory = RecorderFactory()
    session, transport, _ = make(False, factory)
    session.dataReceived(window_update(1, 0, SYN))
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0)]
    proto, = factory.protocols
    assert proto.made and proto.transport is session.streams[1]
    assert proto.address == StreamAddress(transport.getPeer(), 1)
    assert proto.transport.getPeer() == StreamAddress(transport.getPeer(), 1)
    assert proto.transport.getHost() == StreamAddress(transport.getHost(), 1)


def test_accept_syn_on_data():
    factory = RecorderFactory()
    session, transport, _ = make(False, factory)
    session.dataReceived(data_frame(1, b"payload", SYN))
    assert factory.protocols[0].data == b"payload"
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0)]


def test_accept_syn_fin_on_data_closes_like_tcp():
    factory = RecorderFactory()
    session, transport, clock = make(False, factory)
    session.dataReceived(data_frame(1, b"all", SYN | FIN))
    proto, = factory.protocols
    assert proto.data == b"all"
    clock.advance(0)
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0), Frame(WU, FIN, 1, 0)]
    assert proto.lost.check(error.ConnectionDone)
    assert 1 not in session.streams


def test_stream_factory_may_be_replaced():
    session, transport, _ = make(False, None)
    session.dataReceived(window_update(1, 0, SYN))
    assert read_frames(transport) == [Frame(WU, RST, 1, 0)]
    session.stream_factory = RecorderFactory()
    session.dataReceived(window_update(3, 0, SYN))
    assert read_frames(transport) == [Frame(WU, ACK, 3, 0)]


def test_factory_returning_none_resets():
    class Refuse(Factory):
        def buildProtocol(self, addr):
            return None

    session, transport, _ = make(False, Refuse())
    session.dataReceived(data_frame(1, b"ignored", SYN) + ping_frame(5))
    assert read_frames(transport) == [Frame(WU, RST, 1, 0), Frame(PING, ACK, 0, 5)]
    assert session.streams == {} and not session.closed


def test_factory_exception_resets_and_logs(logged_errors):
    class Broken(Factory):
        def buildProtocol(self, addr):
            raise RuntimeError("boom")

    session, transport, _ = make(False, Broken())
    session.dataReceived(window_update(1, 0, SYN))
    assert read_frames(transport) == [Frame(WU, RST, 1, 0)]
    assert len(logged_errors) == 1
    logged_errors.clear()


def test_accept_backlog_exceeded_resets():
    factory = RecorderFactory()
    session, transport, _ = make(False, factory, accept_backlog=2)
    session.dataReceived(b"".join(window_update(i, 0, SYN) for i in (1, 3, 5)))
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0), Frame(WU, ACK, 3, 0),
                                      Frame(WU, RST, 5, 0)]
    # Once ACKed, streams no longer count against the backlog.
    session.dataReceived(window_update(7, 0, SYN))
    assert read_frames(transport) == [Frame(WU, ACK, 7, 0)]
    assert sorted(session.streams) == [1, 3, 7]


def test_wrong_parity_or_zero_syn_is_protocol_error():
    for stream_id in (0, 2):
        session, transport, _ = make(False, RecorderFactory())
        session.dataReceived(window_update(stream_id, 0, SYN))
        assert read_frames(transport) == [Frame(GO, 0, 0, f.GO_AWAY_PROTOCOL_ERROR)]
        assert session.closed and transport.disconnecting


def test_duplicate_syn_is_protocol_error():
    session, transport, _ = make(False, RecorderFactory())
    results = closed_with(session)
    session.dataReceived(window_update(1, 0, SYN) + window_update(1, 0, SYN))
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0), Frame(GO, 0, 0, 1)]
    assert isinstance(results[0], ProtocolError)


# -- ping and keepalive ---------------------------------------------------------

def test_ping_rtt():
    session, transport, clock = make(True)
    rtts = []
    session.ping().addCallback(rtts.append)
    assert read_frames(transport) == [Frame(PING, SYN, 0, 0)]
    clock.advance(0.25)
    session.dataReceived(ping_frame(0, ACK))
    assert rtts == [0.25]
    session.ping()
    assert read_frames(transport) == [Frame(PING, SYN, 0, 1)]


def test_ping_answered_at_once():
    session, transport, _ = make()
    session.dataReceived(ping_frame(0xDEADBEEF))
    assert read_frames(transport) == [Frame(PING, ACK, 0, 0xDEADBEEF)]


def test_unsolicited_ping_ack_ignored():
    session, transport, _ = make()
    session.dataReceived(ping_frame(7, ACK))
    assert transport.value() == b"" and not session.closed


def test_ping_timeout():
    session, _, clock = make(connection_write_timeout=2.0)
    failures = []
    session.ping().addErrback(failures.append)
    clock.advance(2.0)
    assert failures[0].check(PingTimeout)
    assert not session.closed
    session.dataReceived(ping_frame(0, ACK))  # a late answer is ignored


def test_ping_on_closed_session_fails():
    session, _, _ = make()
    session.close()
    failures = []
    session.ping().addErrback(failures.append)
    assert failures[0].check(SessionClosed)


def test_pending_ping_fails_when_session_closes():
    session, _, _ = make()
    failures = []
    session.ping().addErrback(failures.append)
    session.connectionLost(Failure(error.ConnectionLost()))
    assert failures[0].check(SessionClosed)


def test_keepalive():
    session, transport, clock = make()
    clock.advance(29.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert read_frames(transport) == [Frame(PING, SYN, 0, 0)]
    clock.advance(1)
    session.dataReceived(ping_frame(0, ACK))
    clock.advance(29.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert read_frames(transport) == [Frame(PING, SYN, 0, 1)]
    results = closed_with(session)
    clock.advance(10)
    assert session.closed and transport.disconnecting
    assert isinstance(results[0], PingTimeout)
    assert clock.getDelayedCalls() == []


def test_keepalive_disabled():
    session, transport, clock = make(enable_keepalive=False)
    clock.advance(3600)
    assert transport.value() == b"" and clock.getDelayedCalls() == []


# -- GoAway ---------------------------------------------------------------------

def test_go_away_received_blocks_new_streams_only():
    factory = RecorderFactory()
    session, transport, clock = make(True, factory)
    stream = session.open_stream(StreamRecorder())
    told = []
    session.when_go_away().addCallback(told.append)
    session.dataReceived(window_update(1, 0, ACK) + go_away_frame())
    assert session.go_away_received and not session.closed
    assert told == [None]
    assert session.when_go_away().called
    with pytest.raises(GoAwayReceived):
        session.open_stream(StreamRecorder())
    stream.write(b"still works")
    clock.advance(0)
    assert read_frames(transport)[-1] == Frame(DATA, 0, 1, 11, b"still works")
    session.dataReceived(data_frame(1, b"reply"))
    assert stream.protocol.data == b"reply"


@pytest.mark.parametrize("code", [f.GO_AWAY_PROTOCOL_ERROR, f.GO_AWAY_INTERNAL_ERROR, 77])
def test_go_away_with_error_closes(code):
    session, transport, _ = make(True)
    proto = StreamRecorder()
    session.open_stream(proto)
    results = closed_with(session)
    session.dataReceived(go_away_frame(code) + ping_frame(1))
    assert session.closed and transport.disconnecting
    assert isinstance(results[0], RemoteGoAwayError)
    assert proto.lost.check(SessionClosed)
    assert read_frames(transport) == [Frame(WU, SYN, 1, 0)]  # the ping was not answered


def test_go_away_sent_rejects_new_streams_both_ways():
    factory = RecorderFactory()
    session, transport, _ = make(False, factory)
    session.go_away()
    assert read_frames(transport) == [Frame(GO, 0, 0, 0)]
    session.dataReceived(window_update(1, 0, SYN))
    assert read_frames(transport) == [Frame(WU, RST, 1, 0)]
    with pytest.raises(GoAwaySent):
        session.open_stream(StreamRecorder())
    assert not session.closed


def test_go_away_both_ways_over_iosim():
    pair = connected_sessions(server_stream_factory=RecorderFactory())
    stream = pair.client.open_stream(StreamRecorder())
    pair.flush()
    pair.server.go_away()
    pair.client.go_away()
    pair.flush()
    assert pair.client.go_away_received and pair.server.go_away_received
    with pytest.raises(GoAwayReceived):
        pair.client.open_stream(StreamRecorder())
    with pytest.raises(GoAwayReceived):
        pair.server.open_stream(StreamRecorder())
    stream.write(b"x")
    pair.flush()
    assert pair.server.streams[1].protocol.data == b"x"


def test_close_sends_go_away_and_loses_transport():
    session, transport, clock = make(True)
    proto = StreamRecorder()
    session.open_stream(proto)
    results = closed_with(session)
    session.close()
    assert read_frames(transport) == [Frame(WU, SYN, 1, 0), Frame(GO, 0, 0, 0)]
    assert transport.disconnecting and transport.producer is None
    assert proto.lost.check(SessionClosed) and proto.lost.check(error.ConnectionLost)
    assert results == [None]
    assert session.when_closed().result is None
    assert clock.getDelayedCalls() == []
    with pytest.raises(SessionClosed):
        session.open_stream(StreamRecorder())
    session.dataReceived(ping_frame(1))
    assert transport.value() == b""


def test_abort_drops_transport():
    session, transport, _ = make(True)
    session.abort()
    assert session.closed and transport.disconnecting and transport.value() == b""


def test_transport_lost_ends_session():
    session, _, clock = make(True)
    proto = StreamRecorder()
    session.open_stream(proto)
    results = closed_with(session)
    session.connectionLost(Failure(error.ConnectionLost("gone")))
    assert isinstance(results[0], error.ConnectionLost)
    assert proto.lost.check(SessionClosed)
    assert clock.getDelayedCalls() == []


# -- timeouts -------------------------------------------------------------------

def test_open_timeout_closes_session():
    session, transport, clock = make(True, enable_keepalive=False)
    session.open_stream(StreamRecorder())
    results = closed_with(session)
    clock.advance(74.9)
    assert not session.closed
    clock.advance(0.1)
    assert session.closed and transport.disconnecting
    assert isinstance(results[0], StreamOpenTimeout)


def test_ack_cancels_open_timeout():
    session, _, clock = make(True, enable_keepalive=False)
    session.open_stream(StreamRecorder())
    session.dataReceived(window_update(1, 0, ACK))
    assert clock.getDelayedCalls() == []


# -- malformed input ------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    build_frame(WU, 0, 1, 0, version=1),
    build_frame(7, 0, 1, 0),
])
def test_bad_frames_are_protocol_errors(raw):
    session, transport, _ = make(True)
    results = closed_with(session)
    session.dataReceived(raw + ping_frame(1))
    assert read_frames(transport) == [Frame(GO, 0, 0, f.GO_AWAY_PROTOCOL_ERROR)]
    assert session.closed and transport.disconnecting
    assert isinstance(results[0], ProtocolError)


def test_window_overrun_is_protocol_error():
    session, transport, _ = make(True)
    stream = session.open_stream(StreamRecorder())
    transport.clear()
    stream.pauseProducing()  # nothing delivered, so no window credit
    session.dataReceived(data_frame(1, b"a" * 200000, ACK))
    session.dataReceived(f.encode_header(DATA, 0, 1, 262144 - 200000 + 1))
    assert read_frames(transport) == [Frame(GO, 0, 0, f.GO_AWAY_PROTOCOL_ERROR)]
    assert stream.protocol.lost.check(SessionClosed)


def test_frames_for_unknown_streams_ignored():
    session, transport, _ = make(True)
    session.dataReceived(window_update(9, 100) + window_update(9, 0, ACK | FIN)
                         + data_frame(9, b"x" * 1000) + window_update(11, 0, RST)
                         + f.encode_header(DATA, 0, 13, 1 << 30) + b"y" * 10)
    session.dataReceived(b"y" * 5000)
    assert not session.closed and transport.value() == b""


def test_unknown_stream_huge_data_is_skipped_not_buffered():
    session, transport, _ = make(True)
    session.dataReceived(f.encode_header(DATA, 0, 9, 50000))
    session.dataReceived(b"z" * 50000 + ping_frame(3))
    assert read_frames(transport) == [Frame(PING, ACK, 0, 3)]


# -- many streams, nesting, factory ----------------------------------------------

class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def test_many_streams():
    pair = connected_sessions(server_stream_factory=Factory.forProtocol(Echo))
    protos = [StreamRecorder() for _ in range(200)]
    streams = [pair.client.open_stream(p) for p in protos]
    for i, stream in enumerate(streams):
        stream.write(b"%d;" % i * 100)
    pair.flush()
    for i, proto in enumerate(protos):
        assert proto.data == b"%d;" % i * 100
    for stream in streams:
        stream.loseConnection()
    pair.flush()
    assert all(p.lost.check(error.ConnectionDone) for p in protos)
    assert pair.client.streams == {} and pair.server.streams == {}


def test_nested_session_over_a_stream():
    inner_servers = []

    def inner_server():
        session = YamuxSession(False, Factory.forProtocol(Echo), clock=pair.clock)
        inner_servers.append(session)
        return session

    pair = connected_sessions(server_stream_factory=Factory.forProtocol(inner_server))
    inner_client = YamuxSession(True, clock=pair.clock)
    outer_stream = pair.client.open_stream(inner_client)
    assert inner_client.transport is outer_stream
    proto = StreamRecorder()
    inner_stream = inner_client.open_stream(proto)
    inner_stream.write(b"through two layers" * 10000)
    pair.flush()
    assert proto.data == b"through two layers" * 10000
    rtts = []
    inner_client.ping().addCallback(rtts.append)
    pair.flush()
    assert rtts == [0]
    assert inner_servers[0].transport.getPeer().stream_id == 1
    inner_client.close()
    pair.flush()
    assert inner_servers[0].closed and 1 not in pair.client.streams
    assert not pair.client.closed


def test_factory_builds_sessions():
    clock_marker = object()
    stream_factory = RecorderFactory()
    factory = YamuxFactory(True, stream_factory, YamuxConfig(accept_backlog=3), clock_marker)
    session = factory.buildProtocol(None)
    assert isinstance(session, YamuxSession) and session.is_client
    assert session.factory is factory and session.stream_factory is stream_factory
    assert session.config.accept_backlog == 3 and session.clock is clock_marker


def test_default_clock_is_the_reactor(reactor):
    assert YamuxSession(True).clock is reactor


# -- real reactor over loopback TCP -------------------------------------------------

class Collect(StreamRecorder):
    """Fires ``done`` with the data once the stream is closed."""

    def __init__(self, expected):
        super().__init__()
        from twisted.internet.defer import Deferred

        self.expected = expected
        self.done = Deferred()

    def dataReceived(self, data):
        super().dataReceived(data)
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))


@pytest_twisted.inlineCallbacks
def test_sessions_over_loopback_tcp(reactor):
    """Real TCP transports pause the session; 8 MiB across 4 streams still arrive intact."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

    config = YamuxConfig(enable_keepalive=False)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        YamuxFactory(False, Factory.forProtocol(Echo), config, reactor))
    try:
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            YamuxFactory(True, None, config, reactor))
        pauses = []
        pause = client.pauseProducing
        client.pauseProducing = lambda: (pauses.append(1), pause())
        size = 2 * 1024 * 1024
        protos = [Collect(size) for _ in range(4)]
        for i, proto in enumerate(protos):
            client.open_stream(proto).write(bytes([i]) * size)
        results = yield defer.gatherResults([p.done for p in protos]).addTimeout(30, reactor)
        assert results == [bytes([i]) * size for i in range(4)]
        assert pauses  # the TCP transport pushed back and the session honoured it
        rtt = yield client.ping().addTimeout(10, reactor)
        assert rtt >= 0
        closed = client.when_closed()
        client.close()
        yield closed.addTimeout(10, reactor)
    finally:
        yield port.stopListening()


# -- the harness these tests rely on (tests/conftest.py) ------------------------------

GUARDED = '''
from twisted.internet import defer

def test_unhandled_error_in_deferred():
    defer.fail(ValueError("nobody handles me"))

def test_leftover_delayed_call(reactor):
    reactor.callLater(100, lambda: None)

def test_expected_error_is_cleared(logged_errors):
    defer.fail(ValueError("expected"))
    import gc; gc.collect()
    assert logged_errors
    logged_errors.clear()

def test_clean():
    pass
'''


def test_conftest_fails_tests_on_logged_errors_and_leftover_calls(tmp_path):
    import pathlib
    import subprocess
    import sys

    conftest = pathlib.Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    (tmp_path / "test_guarded.py").write_text(GUARDED)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rE", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert "ERROR" in out and "test_unhandled_error_in_deferred" in out
    assert "unhandled errors were logged" in out and "nobody handles me" in out
    assert "test_leftover_delayed_call - Failed: test left delayed" in out
    assert "4 passed, 2 errors" in out


def test_session_counts_every_byte_both_ways():
    pair = connected_sessions()
    stream = pair.client.open_stream(StreamRecorder())
    stream.write(b"x" * 100_000)
    stream.loseWriteConnection()
    pair.flush()
    pair.client.ping()
    pair.flush()
    assert pair.client.bytes_sent == pair.server.bytes_received > 100_000
    assert pair.server.bytes_sent == pair.client.bytes_received > 0
