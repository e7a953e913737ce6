"""Tests for grpcmux.yamux.stream: the stream transport, flow control, backpressure."""

import pytest
from twisted.internet import error
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from grpcmux.testing import (
    Frame,
    HalfCloseRecorder,
    RecorderFactory,
    StreamRecorder,
    connected_sessions,
    data_frame,
    ping_frame,
    read_frames,
    session_on_string_transport,
    window_update,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import StreamReset
from grpcmux.yamux.session import YamuxSession

WU, DATA, PING = f.TYPE_WINDOW_UPDATE, f.TYPE_DATA, f.TYPE_PING
SYN, ACK, FIN, RST = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_FIN, f.FLAG_RST
WINDOW = f.INITIAL_STREAM_WINDOW


def opened(proto=None, **config):
    """A client session on a StringTransport with one ACKed stream (id 1)."""
    session, transport, clock = session_on_string_transport(
        True, None, YamuxConfig(enable_keepalive=False, **config))
    proto = proto if proto is not None else StreamRecorder()
    stream = session.open_stream(proto)
    session.dataReceived(window_update(1, 0, ACK))
    transport.clear()
    return session, transport, clock, stream, proto


@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def test_provides_interfaces():
    _, _, _, stream, _ = opened()
    for iface in (ITransport, IConsumer, IPushProducer):
        assert verifyObject(iface, stream)


def test_write_and_write_sequence_coalesce_into_one_frame():
    _, transport, clock, stream, _ = opened()
    stream.write(b"ab")
    stream.writeSequence([b"cd", bytearray(b"ef")])
    stream.write(memoryview(b"gh"))
    stream.write(b"")
    assert transport.value() == b""
    clock.advance(0)
    assert read_frames(transport) == [Frame(DATA, 0, 1, 8, b"abcdefgh")]


def test_written_buffers_are_sent_as_they_were_at_write_time():
    # Views of bytes are kept as they are (immutable); anything else is copied at write.
    _, transport, clock, stream, _ = opened(max_frame_size=3)
    mutable = bytearray(b"ab")
    stream.write(mutable)
    mutable[:] = b"XY"
    stream.write(memoryview(b"--cdefg")[2:])
    stream.write(memoryview(b"hijk").cast("I"))  # one 4-byte item: still 4 bytes
    clock.advance(0)
    frames = read_frames(transport)
    assert [fr.length for fr in frames] == [3, 3, 3, 2]
    assert b"".join(fr.data for fr in frames) == b"abcdefghijk"


class ChunkRecorder(StreamRecorder):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def dataReceived(self, data):
        self.chunks.append(data)


@pytest.mark.parametrize("views", [False, True])
def test_pieces_of_a_read_are_bytes_unless_the_protocol_takes_views(views):
    proto = ChunkRecorder()
    session, _, _, stream, _ = opened(proto)
    stream.deliver_views = views
    session.dataReceived(data_frame(1, b"abc") + data_frame(1, b"defg"))
    assert [bytes(chunk) for chunk in proto.chunks] == [b"abc", b"defg"]
    expected = memoryview if views else bytes
    assert [type(chunk) for chunk in proto.chunks] == [expected, expected]


def test_data_frames_bounded_by_max_frame_size():
    _, transport, clock, stream, _ = opened(max_frame_size=1000)
    stream.write(b"x" * 2500)
    clock.advance(0)
    assert [fr.length for fr in read_frames(transport)] == [1000, 1000, 500]


def test_send_window_respected_and_update_resumes():
    _, transport, clock, stream, _ = opened(max_frame_size=WINDOW)
    stream.write(b"x" * (WINDOW + 10))
    clock.advance(0)
    assert [fr.length for fr in read_frames(transport)] == [WINDOW]
    stream.session.dataReceived(window_update(1, 4))
    clock.advance(0)
    assert [fr.length for fr in read_frames(transport)] == [4]
    stream.session.dataReceived(window_update(1, 100))
    assert [fr.length for fr in read_frames(transport)] == [6]


def test_producer_paused_once_on_spent_window_and_resumed_once():
    _, transport, clock, stream, _ = opened(max_frame_size=WINDOW)
    producer = Producer()
    stream.registerProducer(producer, True)
    assert producer.calls == []
    stream.write(b"x" * WINDOW)
    stream.write(b"y")
    clock.advance(0)
    assert producer.calls == ["pause"]
    stream.session.dataReceived(window_update(1, 1))
    assert producer.calls == ["pause"]  # buffer drained, window spent again
    stream.session.dataReceived(window_update(1, 1000))
    assert producer.calls == ["pause", "resume"]
    stream.session.dataReceived(window_update(1, 1000))
    assert producer.calls == ["pause", "resume"]


def test_producer_paused_above_high_water_mark():
    _, transport, clock, stream, _ = opened(max_stream_send_buffer=100)
    producer = Producer()
    stream.registerProducer(producer, True)
    stream.write(b"x" * 99)
    assert producer.calls == []
    stream.write(b"x")
    stream.write(b"x")
    assert producer.calls == ["pause"]
    clock.advance(0)
    assert producer.calls == ["pause", "resume"]
    stream.unregisterProducer()
    stream.write(b"x" * 1000)
    assert producer.calls == ["pause", "resume"]


def test_register_producer_twice_raises_and_after_close_stops():
    _, _, _, stream, _ = opened()
    stream.registerProducer(Producer(), True)
    with pytest.raises(RuntimeError):
        stream.registerProducer(Producer(), True)
    stream.abortConnection()
    late = Producer()
    stream.registerProducer(late, True)
    assert late.calls == ["stop"]


def test_pull_producer_resumed_when_buffer_empty():
    _, transport, clock, stream, _ = opened()

    class Pull:
        count = 0

        def resumeProducing(self):
            self.count += 1
            if self.count <= 3:
                stream.write(b"chunk")
            else:
                stream.unregisterProducer()

        def stopProducing(self):
            pass

    stream.registerProducer(Pull(), False)
    for _ in range(4):
        clock.advance(0)
    assert b"".join(fr.data for fr in read_frames(transport)) == b"chunk" * 3


def test_window_credited_only_for_delivered_bytes():
    session, transport, _, stream, proto = opened()
    session.dataReceived(data_frame(1, b"a" * (WINDOW // 2 - 1)))
    assert transport.value() == b""
    session.dataReceived(data_frame(1, b"a"))
    assert read_frames(transport) == [Frame(WU, 0, 1, WINDOW // 2)]
    stream.pauseProducing()
    session.dataReceived(data_frame(1, b"b" * WINDOW))  # the window is full again
    assert transport.value() == b"" and len(proto.data) == WINDOW // 2
    stream.resumeProducing()
    assert len(proto.data) == WINDOW // 2 + WINDOW
    assert read_frames(transport) == [Frame(WU, 0, 1, WINDOW)]


def test_paused_stream_never_pauses_connection_or_other_streams():
    factory = RecorderFactory()
    session, transport, _ = session_on_string_transport(False, factory)
    session.dataReceived(window_update(1, 0, SYN) + window_update(3, 0, SYN))
    slow, fast = factory.protocols
    slow.transport.pauseProducing()
    transport.clear()
    session.dataReceived(data_frame(1, b"s" * WINDOW) + data_frame(3, b"f" * WINDOW))
    assert slow.data == b"" and len(fast.data) == WINDOW
    assert transport.producerState == "producing"
    assert read_frames(transport) == [Frame(WU, 0, 3, WINDOW)]
    assert session.streams[1].receive_window == 0
    slow.transport.resumeProducing()
    assert len(slow.data) == WINDOW


def test_pause_inside_data_received_buffers_rest():
    class Pauser(StreamRecorder):
        def dataReceived(self, data):
            super().dataReceived(data)
            self.transport.pauseProducing()

    session, transport, _, stream, proto = opened(Pauser())
    session.dataReceived(data_frame(1, b"one") + data_frame(1, b"two") + data_frame(1, b"", FIN))
    assert proto.data == b"one"
    stream.resumeProducing()
    assert proto.data == b"onetwo"
    assert proto.lost is None
    stream.resumeProducing()
    assert proto.lost is None  # FIN delivered after the data: the stream closes like TCP
    assert stream.disconnecting


def test_round_robin_fairness():
    session, transport, clock = session_on_string_transport(
        True, None, YamuxConfig(enable_keepalive=False, max_frame_size=1000))
    streams = [session.open_stream(StreamRecorder()) for _ in range(3)]
    transport.clear()
    for stream in streams:
        stream.write(b"x" * 3000)
    clock.advance(0)
    assert [fr.stream_id for fr in read_frames(transport)] == [1, 3, 5] * 3


def test_transport_pause_stops_data_but_not_control():
    session, transport, clock, stream, _ = opened()
    transport.pauseProducing()  # what a full TCP buffer does
    session.pauseProducing()
    stream.write(b"data")
    clock.advance(0)
    session.ping()
    session.dataReceived(ping_frame(9))
    assert read_frames(transport) == [Frame(PING, SYN, 0, 0), Frame(PING, ACK, 0, 9)]
    session.resumeProducing()
    assert read_frames(transport) == [Frame(DATA, 0, 1, 4, b"data")]


def test_control_frames_go_before_data():
    session, transport, clock, stream, _ = opened()
    stream.write(b"queued")
    session.dataReceived(ping_frame(5))
    assert read_frames(transport) == [Frame(PING, ACK, 0, 5), Frame(DATA, 0, 1, 6, b"queued")]


def test_control_flood_while_write_paused_stops_reading():
    session, transport, _ = session_on_string_transport(False, None, YamuxConfig(max_control_buffer=120))
    session.pauseProducing()
    session.dataReceived(b"".join(ping_frame(i) for i in range(10)))
    assert transport.producerState == "producing"
    session.dataReceived(ping_frame(11))
    assert transport.producerState == "paused"
    session.resumeProducing()
    assert transport.producerState == "producing"


class FillingTransport(StringTransport):
    """Pauses its producer once it holds more than ``limit`` bytes, as a TCP transport does."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.full = False

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.limit and not self.full:
            self.full = True
            self.producer.pauseProducing()


def test_answers_that_fill_the_transport_count_against_the_control_buffer():
    # The answers to one read fill the transport: they are what the peer is not
    # reading, so reading stops before the next read adds as much again.
    transport = FillingTransport(limit=100)
    session = YamuxSession(False, None, YamuxConfig(max_control_buffer=120), Clock())
    session.makeConnection(transport)
    session.dataReceived(b"".join(ping_frame(i) for i in range(11)))  # 132 bytes of answers
    assert transport.full and transport.producerState == "paused"
    assert len(read_frames(transport)) == 11


def test_half_close_both_ways():
    proto = HalfCloseRecorder()
    session, transport, clock, stream, _ = opened(proto)
    stream.write(b"request")
    stream.loseWriteConnection()
    stream.write(b"dropped")
    clock.advance(0)
    # FIN on its own frame after the data: old Go peers may drop a DATA|FIN body.
    assert read_frames(transport) == [Frame(DATA, 0, 1, 7, b"request"), Frame(WU, FIN, 1, 0)]
    assert proto.write_closed and not proto.read_closed and proto.lost is None
    session.dataReceived(data_frame(1, b"response"))
    session.dataReceived(window_update(1, 0, FIN))
    assert proto.data == b"response" and proto.read_closed
    assert proto.lost.check(error.ConnectionDone)
    assert 1 not in session.streams
    session.dataReceived(window_update(1, 100))  # Go sends updates for closed streams
    assert not session.closed and transport.value() == b""


def test_half_close_remote_first():
    proto = HalfCloseRecorder()
    session, transport, clock, stream, _ = opened(proto)
    session.dataReceived(data_frame(1, b"req", FIN))
    assert proto.read_closed and proto.lost is None
    stream.write(b"resp")
    stream.loseConnection()
    clock.advance(0)
    assert read_frames(transport) == [Frame(DATA, 0, 1, 4, b"resp"), Frame(WU, FIN, 1, 0)]
    assert proto.lost.check(error.ConnectionDone) and not proto.write_closed


def test_remote_fin_without_half_close_closes_like_tcp():
    session, transport, clock, stream, proto = opened()
    session.dataReceived(window_update(1, 0, FIN))
    assert read_frames(transport) == [Frame(WU, FIN, 1, 0)]
    assert proto.lost.check(error.ConnectionDone)


def test_lose_connection_discards_but_credits_input():
    session, transport, clock, stream, proto = opened()
    stream.loseConnection()
    clock.advance(0)
    assert read_frames(transport) == [Frame(WU, FIN, 1, 0)]
    session.dataReceived(data_frame(1, b"z" * WINDOW))
    assert proto.data == b"" and read_frames(transport) == [Frame(WU, 0, 1, WINDOW)]
    session.dataReceived(data_frame(1, b"z" * WINDOW))
    assert not session.closed
    session.dataReceived(window_update(1, 0, FIN))
    assert proto.lost.check(error.ConnectionDone)


def test_close_timeout_resets():
    session, transport, clock, stream, proto = opened()
    stream.loseConnection()
    clock.advance(0)
    transport.clear()
    clock.advance(299)
    assert proto.lost is None
    clock.advance(1)
    assert read_frames(transport) == [Frame(WU, RST, 1, 0)]
    assert proto.lost.check(StreamReset)
    assert clock.getDelayedCalls() == []


def test_remote_rst():
    session, transport, clock, stream, proto = opened()
    producer = Producer()
    stream.registerProducer(producer, True)
    stream.write(b"pending")
    session.dataReceived(window_update(1, 0, RST))
    assert proto.lost.check(StreamReset) and producer.calls == ["stop"]
    clock.advance(0)
    assert transport.value() == b""
    stream.write(b"dropped")
    stream.loseConnection()
    clock.advance(0)
    assert transport.value() == b"" and 1 not in session.streams


def test_abort_connection_sends_rst():
    session, transport, clock, stream, proto = opened()
    stream.write(b"never sent")
    stream.abortConnection()
    clock.advance(0)
    assert read_frames(transport) == [Frame(WU, RST, 1, 0)]
    assert proto.lost.check(error.ConnectionAborted)
    stream.abortConnection()
    assert transport.value() == b""


def test_stop_producing_loses_connection():
    _, transport, clock, stream, _ = opened()
    stream.stopProducing()
    clock.advance(0)
    assert read_frames(transport) == [Frame(WU, FIN, 1, 0)]


def test_protocol_exception_aborts_stream(logged_errors):
    class Broken(StreamRecorder):
        def dataReceived(self, data):
            raise ValueError("bad")

    session, transport, _, stream, proto = opened(Broken())
    session.dataReceived(data_frame(1, b"x") + ping_frame(2))
    assert read_frames(transport) == [Frame(WU, RST, 1, 0), Frame(PING, ACK, 0, 2)]
    assert proto.lost.check(error.ConnectionAborted) and not session.closed
    assert len(logged_errors) == 1
    logged_errors.clear()


def test_backpressure_end_to_end_memory_bounded():
    """A peer that never reads: our buffers stay within a window and the high-water mark."""
    session, transport, clock, stream, proto = opened(max_stream_send_buffer=64 * 1024)
    producer = Producer()
    stream.registerProducer(producer, True)
    for _ in range(100):
        if producer.calls[-1:] == ["pause"]:
            break
        stream.write(b"q" * 16384)
        clock.advance(0)
    sent = sum(fr.length for fr in read_frames(transport))
    assert sent == WINDOW
    assert stream.send_buffered <= 64 * 1024
    assert producer.calls == ["pause"]


def test_streams_over_iosim_transfer_large_data_both_ways():
    pair = connected_sessions(server_stream_factory=Factory.forProtocol(StreamRecorder))
    proto = StreamRecorder()
    stream = pair.client.open_stream(proto)
    payload = bytes(range(256)) * 8000
    stream.write(payload)
    pair.flush()
    server_proto = pair.server.streams[1].protocol
    assert server_proto.data == payload
    server_proto.transport.write(payload[::-1])
    pair.flush()
    assert proto.data == payload[::-1]


def test_one_flush_sends_a_bounded_amount_then_yields():
    session, transport, clock = session_on_string_transport(
        True, None, YamuxConfig(enable_keepalive=False))
    streams = [session.open_stream(StreamRecorder()) for _ in range(8)]
    transport.clear()
    for stream in streams:
        stream.write(b"w" * WINDOW)
    session.sender.flush()  # what the reactor runs; the rest waits for the next iteration
    first = sum(fr.length for fr in read_frames(transport))
    assert 1024 * 1024 <= first < 8 * WINDOW
    assert [c.func for c in clock.getDelayedCalls() if c.getTime() == 0] == [session.sender.flush]
    clock.advance(0)
    assert first + sum(fr.length for fr in read_frames(transport)) == 8 * WINDOW


def test_data_after_remote_fin_is_dropped():
    proto = HalfCloseRecorder()
    session, transport, _, stream, _ = opened(proto)
    session.dataReceived(data_frame(1, b"last", FIN) + data_frame(1, b"late"))
    assert proto.data == b"last" and proto.read_closed and not session.closed


def test_protocol_may_be_switched_between_deliveries():
    """A handshake protocol can hand the stream to another protocol (legacy nesting)."""
    second = StreamRecorder()

    class Handshake(StreamRecorder):
        def dataReceived(self, data):
            line, _, rest = bytes(data).partition(b"\n")
            self.line = line
            self.transport.protocol = second
            second.makeConnection(self.transport)
            if rest:
                second.dataReceived(rest)

    session, _, _, stream, first = opened(Handshake())
    session.dataReceived(data_frame(1, b"client-7\nabc") + data_frame(1, b"def"))
    assert first.line == b"client-7" and second.data == b"abcdef"
    session.dataReceived(window_update(1, 0, RST))
    assert second.lost.check(StreamReset) and first.lost is None


def test_tiny_frames_on_a_paused_stream_are_buffered_compactly():
    class Counting(StreamRecorder):
        calls = 0

        def dataReceived(self, data):
            self.calls += 1
            super().dataReceived(data)

    session, transport, _, stream, proto = opened(Counting())
    stream.pauseProducing()
    session.dataReceived(b"".join(data_frame(1, b"%d" % (i % 10)) for i in range(10000)))
    assert stream.receive_buffered == 10000 and proto.calls == 0
    stream.resumeProducing()
    assert proto.calls == 1 and proto.data == b"0123456789" * 1000
