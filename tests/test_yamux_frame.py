"""Tests for grpcmux.yamux.frame: header codec and the incremental parser."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from grpcmux import testing
from grpcmux.yamux import frame
from grpcmux.yamux.errors import ProtocolError


class Recorder:
    """A parser handler that records frames, optionally rejecting bodies."""

    def __init__(self, want=True, limit=None):
        self.events = []
        self.want = want
        self.limit = limit

    def frame_received(self, header):
        if self.limit is not None and header.type == frame.TYPE_DATA and header.length > self.limit:
            raise ProtocolError("too long")
        self.events.append(("frame", header))
        return self.want

    def data_received(self, header, chunk, last):
        assert isinstance(chunk, (bytes, memoryview))
        self.events.append(("data", header.stream_id, bytes(chunk), last))

    def frames(self):
        """Rebuild (header, body) pairs from the events."""
        result = []
        for event in self.events:
            if event[0] == "frame":
                result.append([event[1], b""])
            else:
                result[-1][1] += event[2]
        return [(h, b) for h, b in result]


def test_constants():
    assert frame.VERSION == 0
    assert frame.HEADER_SIZE == 12
    assert frame.INITIAL_STREAM_WINDOW == 262144
    assert (frame.TYPE_DATA, frame.TYPE_WINDOW_UPDATE, frame.TYPE_PING, frame.TYPE_GO_AWAY) == (0, 1, 2, 3)
    assert (frame.FLAG_SYN, frame.FLAG_ACK, frame.FLAG_FIN, frame.FLAG_RST) == (1, 2, 4, 8)
    assert (frame.GO_AWAY_NORMAL, frame.GO_AWAY_PROTOCOL_ERROR, frame.GO_AWAY_INTERNAL_ERROR) == (0, 1, 2)


def test_encode_header_is_big_endian():
    raw = frame.encode_header(frame.TYPE_WINDOW_UPDATE, frame.FLAG_SYN | frame.FLAG_ACK, 0x01020304, 0x0A0B0C0D)
    assert raw == bytes([0, 1, 0, 3, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D])


@given(
    st.integers(0, 3), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)
)
@settings(max_examples=50)
def test_header_round_trip(ftype, flags, stream_id, length):
    header = frame.decode_header(frame.encode_header(ftype, flags, stream_id, length))
    assert header == frame.FrameHeader(0, ftype, flags, stream_id, length)


def test_decode_header_at_offset():
    raw = b"xx" + frame.encode_header(frame.TYPE_PING, frame.FLAG_ACK, 0, 7)
    assert frame.decode_header(raw, 2) == (0, frame.TYPE_PING, frame.FLAG_ACK, 0, 7)


def _sample_stream():
    return b"".join([
        testing.window_update(1, 5, frame.FLAG_SYN),
        testing.data_frame(1, b"hello world"),
        testing.ping_frame(99),
        testing.data_frame(3, b""),
        testing.data_frame(1, b"x" * 300, frame.FLAG_FIN),
        testing.go_away_frame(frame.GO_AWAY_NORMAL),
    ])


def _expected():
    return [
        (frame.FrameHeader(0, 1, 1, 1, 5), b""),
        (frame.FrameHeader(0, 0, 0, 1, 11), b"hello world"),
        (frame.FrameHeader(0, 2, 1, 0, 99), b""),
        (frame.FrameHeader(0, 0, 0, 3, 0), b""),
        (frame.FrameHeader(0, 0, 4, 1, 300), b"x" * 300),
        (frame.FrameHeader(0, 3, 0, 0, 0), b""),
    ]


def test_parse_whole_buffer_delivers_bodies_without_splitting():
    rec = Recorder()
    frame.FrameParser(rec).feed(_sample_stream())
    assert rec.frames() == _expected()
    data_events = [e for e in rec.events if e[0] == "data"]
    assert [e[3] for e in data_events] == [True, True]


def test_parse_byte_at_a_time():
    rec = Recorder()
    parser = frame.FrameParser(rec)
    for byte in _sample_stream():
        parser.feed(bytes([byte]))
    assert rec.frames() == _expected()
    lasts = [e[3] for e in rec.events if e[0] == "data"]
    assert lasts.count(True) == 2 and lasts[-1] is True


@given(st.lists(st.integers(0, 400), max_size=12))
@settings(max_examples=60)
def test_parse_any_split(cuts):
    data = _sample_stream()
    points = sorted({min(c, len(data)) for c in cuts})
    rec = Recorder()
    parser = frame.FrameParser(rec)
    prev = 0
    for point in points + [len(data)]:
        parser.feed(data[prev:point])
        prev = point
    assert rec.frames() == _expected()


def test_window_update_length_is_not_a_payload():
    """A huge WINDOW_UPDATE/PING/GO_AWAY length is a value: the next frame follows at once."""
    rec = Recorder()
    data = (testing.window_update(1, 0xFFFFFFFF) + testing.ping_frame(0xFFFFFFFF)
            + testing.go_away_frame(0xFFFFFFFF) + testing.data_frame(1, b"ok"))
    frame.FrameParser(rec).feed(data)
    assert [h.type for h, _ in rec.frames()] == [1, 2, 3, 0]
    assert rec.frames()[-1][1] == b"ok"


def test_unwanted_body_is_skipped_without_buffering():
    rec = Recorder(want=False)
    parser = frame.FrameParser(rec)
    parser.feed(frame.encode_header(frame.TYPE_DATA, 0, 5, 1 << 31))
    for _ in range(10):
        parser.feed(b"\0" * 65536)
    assert parser.buffered == 0
    assert [e[0] for e in rec.events] == ["frame"]


def test_large_announced_length_is_streamed_not_buffered():
    rec = Recorder()
    parser = frame.FrameParser(rec)
    parser.feed(frame.encode_header(frame.TYPE_DATA, 0, 1, 100000))
    parser.feed(b"a" * 1000)
    assert rec.events[-1] == ("data", 1, b"a" * 1000, False)
    assert parser.buffered == 0


@pytest.mark.parametrize("raw", [
    struct.pack(">BBHII", 1, 0, 0, 1, 0),
    struct.pack(">BBHII", 0, 4, 0, 1, 0),
    struct.pack(">BBHII", 0, 255, 0, 1, 0),
])
def test_bad_version_or_type_raises_and_stops(raw):
    rec = Recorder()
    parser = frame.FrameParser(rec)
    with pytest.raises(ProtocolError):
        parser.feed(raw + testing.ping_frame(1))
    parser.feed(testing.ping_frame(2))
    assert rec.events == []


def test_handler_protocol_error_stops_parser():
    rec = Recorder(limit=10)
    parser = frame.FrameParser(rec)
    with pytest.raises(ProtocolError):
        parser.feed(testing.data_frame(1, b"y" * 11) + testing.ping_frame(1))
    parser.feed(testing.ping_frame(2))
    assert rec.events == []


def test_stop_ignores_rest_of_feed():
    class Stopper(Recorder):
        def frame_received(self, header):
            parser.stop()
            return super().frame_received(header)

    rec = Stopper()
    parser = frame.FrameParser(rec)
    parser.feed(testing.ping_frame(1) + testing.ping_frame(2))
    assert len(rec.events) == 1


def test_testing_helpers_round_trip():
    data = testing.data_frame(7, b"abc", frame.FLAG_FIN) + testing.window_update(7, 10, frame.FLAG_ACK)
    assert testing.parse_frames(data) == [
        testing.Frame(0, frame.FLAG_FIN, 7, 3, b"abc"),
        testing.Frame(1, frame.FLAG_ACK, 7, 10),
    ]
    with pytest.raises(ValueError):
        testing.parse_frames(data[:-1])


def test_parser_tells_what_it_holds_and_where_it_is():
    rec = Recorder()
    parser = frame.FrameParser(rec)
    assert (parser.buffered, parser.at_frame_boundary) == (0, True)
    header = frame.encode_header(frame.TYPE_DATA, 0, 1, 3)
    parser.feed(header[:5])
    assert (parser.buffered, parser.at_frame_boundary) == (5, False)
    parser.feed(header[5:] + b"ab")
    assert (parser.buffered, parser.at_frame_boundary) == (0, False)  # in the body
    parser.feed(b"c")
    assert (parser.buffered, parser.at_frame_boundary) == (0, True)
