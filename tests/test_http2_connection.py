"""The router's HTTP/2 codec (grpcmux.http2.connection), one RFC 9113 rule or bound per test.

Callers are raw-frame peers on StringTransports (tests/h2_harness.py); time is a
task.Clock. Rates use buckets with a near-zero refill so that only the burst counts.
"""

import pytest
from hpack import Encoder
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

import h2_frames as h2
from grpcmux.http2.config import H2Config
from grpcmux.http2.connection import H2Connection
from grpcmux.http2.frames import (
    ERROR_COMPRESSION_ERROR,
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_FLOW_CONTROL_ERROR,
    ERROR_FRAME_SIZE_ERROR,
    ERROR_NO_ERROR,
    ERROR_PROTOCOL_ERROR,
    ERROR_REFUSED_STREAM,
    ERROR_SETTINGS_TIMEOUT,
    ERROR_STREAM_CLOSED,
    FLAG_END_HEADERS,
    MAX_WINDOW,
    PREFACE,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_GRPCMUX_PROXY,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    TYPE_CONTINUATION,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_PRIORITY,
    TYPE_PUSH_PROMISE,
    TYPE_RST_STREAM,
    TYPE_SETTINGS,
    TYPE_WINDOW_UPDATE,
)
from h2_harness import RouterHarness, request

CALM = dict(control_rate=0.001, reset_rate=0.001)


def harness(**caller):
    return RouterHarness(caller=H2Config(**caller))


def goaway_of(peer):
    """The GOAWAY the router sent ``peer`` (asserting there is exactly one)."""
    peer.frames()
    frames = [f for f in peer.received if f.type == TYPE_GOAWAY]
    assert len(frames) == 1, frames
    return frames[0]


def only(frames, frame_type, stream_id=None):
    return [f for f in frames if f.type == frame_type
            and (stream_id is None or f.stream_id == stream_id)]


def closed_with(peer, code):
    assert goaway_of(peer).error_code == code
    assert peer.disconnecting


# -- preface and SETTINGS ------------------------------------------------------


def test_client_preface_is_required():
    h = harness()
    caller = h.caller(start=False)
    caller.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_preface_may_arrive_byte_by_byte():
    h = harness()
    caller = h.caller(start=False)
    for byte in PREFACE + h2.settings():
        caller.send(bytes([byte]))
    assert only(caller.frames(), TYPE_SETTINGS)[-1].ack
    assert not caller.disconnecting


def test_no_preface_in_time_is_settings_timeout():
    h = harness(preface_timeout=10)
    caller = h.caller(start=False)
    h.clock.advance(9.9)
    assert not caller.disconnecting
    h.clock.advance(0.1)
    closed_with(caller, ERROR_SETTINGS_TIMEOUT)


def test_preface_without_settings_is_settings_timeout():
    h = harness(preface_timeout=10)
    caller = h.caller(start=False)
    caller.send(PREFACE)
    h.clock.advance(10)
    closed_with(caller, ERROR_SETTINGS_TIMEOUT)


def test_settings_in_time_cancel_the_preface_timer():
    h = harness(preface_timeout=10, idle_timeout=0)
    caller = h.caller()
    assert not h.clock.getDelayedCalls()
    assert not caller.disconnecting


def test_first_frame_must_be_settings():
    h = harness()
    caller = h.caller(start=False)
    caller.send(PREFACE, h2.ping())
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_our_settings_announce_limits_and_the_proxy():
    h = harness(max_concurrent_streams=7, initial_window=12345, max_header_list_size=999,
                header_table_size=2048)
    caller = h.caller(start=False)
    first, window = caller.frames()[:2]
    assert first.type == TYPE_SETTINGS and not first.ack
    assert first.settings == {
        SETTINGS_ENABLE_PUSH: 0, SETTINGS_INITIAL_WINDOW_SIZE: 12345,
        SETTINGS_MAX_HEADER_LIST_SIZE: 999, SETTINGS_HEADER_TABLE_SIZE: 2048,
        SETTINGS_MAX_CONCURRENT_STREAMS: 7, SETTINGS_GRPCMUX_PROXY: 1,
    }
    # The connection window opens wide at once: it is credited on receipt.
    assert (window.type, window.stream_id, window.increment) == (
        TYPE_WINDOW_UPDATE, 0, MAX_WINDOW - 65535)


def test_peer_settings_are_acknowledged():
    h = harness()
    caller = h.caller()
    acks = [f for f in only(caller.frames(), TYPE_SETTINGS) if f.ack]
    assert len(acks) == 1 and acks[0].payload == b""


def test_settings_ack_with_payload_is_frame_size_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_SETTINGS, 1, 0, b"\0" * 6))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


def test_settings_of_bad_length_is_frame_size_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_SETTINGS, 0, 0, b"\0" * 5))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


def test_settings_on_a_stream_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_SETTINGS, 0, 1, b""))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


@pytest.mark.parametrize("setting, value, code", [
    (SETTINGS_ENABLE_PUSH, 2, ERROR_PROTOCOL_ERROR),
    (SETTINGS_INITIAL_WINDOW_SIZE, 2**31, ERROR_FLOW_CONTROL_ERROR),
    (SETTINGS_MAX_FRAME_SIZE, 16383, ERROR_PROTOCOL_ERROR),
    (SETTINGS_MAX_FRAME_SIZE, 2**24, ERROR_PROTOCOL_ERROR),
])
def test_settings_out_of_range_are_connection_errors(setting, value, code):
    h = harness()
    caller = h.caller(start=False)
    caller.send(PREFACE, h2.settings((setting, value)))
    closed_with(caller, code)


def test_a_setting_repeated_in_one_frame_is_applied_once(monkeypatch):
    # 2,730 INITIAL_WINDOW_SIZE values in one 16 KiB frame, each a pass over 1,000
    # streams, cost 0.14 s of CPU per frame: the last value of each setting counts.
    applied = []
    original = H2Connection._setting
    monkeypatch.setattr(H2Connection, "_setting",
                        lambda self, key, value: (applied.append(key), original(self, key, value)))
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    applied.clear()
    caller.send(h2.settings(*[(SETTINGS_INITIAL_WINDOW_SIZE, 1000 + i) for i in range(2730)]))
    assert applied == [SETTINGS_INITIAL_WINDOW_SIZE]
    assert caller.protocol.streams[1].send_window == 1000 + 2729


def test_unknown_settings_are_ignored():
    h = harness()
    caller = h.caller(settings=[(0x4242, 7)])
    assert not caller.disconnecting


# -- PING, GOAWAY, unknown and forbidden frames -----------------------------------


def test_ping_is_answered_with_the_same_payload_within_the_ack_delay():
    h = harness(ping_ack_delay=0.005, idle_timeout=0)
    caller = h.caller()
    caller.frames()
    caller.send(h2.ping(b"12345678"))
    assert caller.frames() == []
    h.clock.advance(0.005)
    (answer,) = caller.frames()
    assert (answer.type, answer.ack, answer.payload) == (TYPE_PING, True, b"12345678")
    assert not h.clock.getDelayedCalls()


def test_ping_ack_goes_out_with_our_next_frame():
    h = harness(ping_ack_delay=0.005, idle_timeout=0)
    caller = h.caller()
    caller.frames()
    caller.send(h2.ping(b"first..."), h2.ping(b"second.."), h2.settings())
    answers = caller.frames()
    assert [(f.type, f.ack) for f in answers] == [
        (TYPE_PING, True), (TYPE_PING, True), (TYPE_SETTINGS, True)]
    assert [f.payload for f in answers[:2]] == [b"first...", b"second.."]
    assert not h.clock.getDelayedCalls()  # nothing is left to send later


def test_ping_ack_delay_zero_answers_at_once():
    h = harness(ping_ack_delay=0)
    caller = h.caller()
    caller.frames()
    caller.send(h2.ping(b"12345678"))
    (answer,) = caller.frames()
    assert answer.ack and answer.payload == b"12345678"


def test_held_ping_acks_are_bounded():
    h = harness(ping_ack_delay=10.0, idle_timeout=0)
    caller = h.caller()
    caller.frames()
    caller.send(h2.ping() * 15)
    assert caller.frames() == []
    caller.send(h2.ping())  # the 16th: all go out now
    assert len([f for f in caller.frames() if f.type == TYPE_PING and f.ack]) == 16


def test_ping_ack_is_not_answered():
    h = harness()
    caller = h.caller()
    caller.frames()
    caller.send(h2.ping(ack=True))
    assert caller.frames() == []


def test_ping_of_bad_size_is_frame_size_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_PING, 0, 0, b"1234567"))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


def test_ping_on_a_stream_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_PING, 0, 1, b"12345678"))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_unknown_frame_types_are_ignored():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(0x42, 0xFF, 3, b"whatever"), h2.ping())
    h.clock.advance(H2Config().ping_ack_delay)
    assert only(caller.frames(), TYPE_PING)
    assert not caller.disconnecting


def test_push_promise_from_a_client_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, b"\0\0\0\2"))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_frame_larger_than_our_max_frame_size_is_frame_size_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, b"x" * 16385))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


def test_priority_of_bad_size_is_frame_size_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_PRIORITY, 0, 1, b"\0" * 4))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


def test_goaway_from_the_caller_with_no_streams_closes():
    h = harness()
    caller = h.caller()
    caller.send(h2.goaway(0))
    assert caller.disconnecting


# -- streams: ids and states (section 5.1) ------------------------------------------


@pytest.mark.parametrize("name, frame", [
    ("DATA", h2.data(5, b"x")),
    ("WINDOW_UPDATE", h2.window_update(5, 1)),
    ("RST_STREAM", h2.rst_stream(5, 8)),
])
def test_frames_on_idle_streams_are_protocol_errors(name, frame):
    h = harness()
    caller = h.caller()
    caller.send(frame)
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_data_on_stream_0_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.data(0, b"x"))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_headers_on_stream_0_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.call(0)
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_client_stream_with_even_id_is_protocol_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(2)
    closed_with(caller, ERROR_PROTOCOL_ERROR)
    assert not h.tunnels["alpha"].upstreams


def test_headers_on_a_lower_stream_id_are_not_a_new_call():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(5)
    caller.call(3)
    # Stream 3 is closed (implicitly, section 5.1.1): it cannot carry a new call. It
    # may be a reset stream's trailers still in flight, so it is a stream error only.
    upstream = h.tunnels["alpha"].upstream
    assert [f.stream_id for f in upstream.headers_frames()] == [1]
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 3)
    assert reset.error_code == ERROR_STREAM_CLOSED and not caller.disconnecting


def test_data_after_end_stream_is_stream_closed():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1, end_stream=True)
    caller.frames()
    caller.send(h2.data(1, b"late"))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_STREAM_CLOSED
    assert not caller.disconnecting


def test_rst_stream_of_bad_size_is_frame_size_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.frame(TYPE_RST_STREAM, 0, 1, b"\0\0\0"))
    closed_with(caller, ERROR_FRAME_SIZE_ERROR)


# -- header blocks (section 4.3, 6.10) ---------------------------------------------


def test_header_block_may_span_continuation_frames():
    h = harness()
    h.client()
    caller = h.caller()
    caller.headers(1, request(extra=[(b"x-big", b"v" * 300)]), split=64)
    (sent,) = h.tunnels["alpha"].upstream.headers_frames(1)
    assert sent.header(b"x-big") == [b"v" * 300]


def test_header_block_interrupted_is_protocol_error():
    h = harness()
    caller = h.caller()
    block = Encoder().encode(request())
    caller.send(h2.frame(TYPE_HEADERS, 0, 1, block[:10]), h2.ping())
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_continuation_of_another_stream_is_protocol_error():
    h = harness()
    caller = h.caller()
    block = Encoder().encode(request())
    caller.send(h2.frame(TYPE_HEADERS, 0, 1, block[:10]),
                h2.frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, block[10:]))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_continuation_without_headers_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b""))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_settings_flood_is_enhance_your_calm_whatever_traffic_earns():
    # SETTINGS may touch every open stream: they have a budget of their own that
    # DATA does not refill (a caller alternating window sizes while data waits).
    h = harness(settings_rate=0.001, settings_burst=5)
    h.client()
    caller = h.caller()  # its first SETTINGS took one
    caller.call(1)
    for size in (1, 0, 1, 0):
        caller.send(h2.data(1, b"x"), h2.settings((SETTINGS_INITIAL_WINDOW_SIZE, size)))
    assert not caller.disconnecting
    caller.send(h2.settings((SETTINGS_INITIAL_WINDOW_SIZE, 1)))
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)


def test_continuation_flood_is_enhance_your_calm():
    h = harness(max_continuations=4)
    h.client()
    caller = h.caller()
    caller.send(h2.frame(TYPE_HEADERS, 0, 1, Encoder().encode(request())))
    caller.send(*[h2.frame(TYPE_CONTINUATION, 0, 1, b"") for _ in range(4)])
    assert not caller.disconnecting
    caller.send(h2.frame(TYPE_CONTINUATION, 0, 1, b""))
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)
    assert not h.tunnels["alpha"].upstreams


def test_oversized_header_block_is_enhance_your_calm():
    h = harness(max_header_block=1000)
    h.client()
    caller = h.caller()
    caller.send(h2.frame(TYPE_HEADERS, 0, 1, b"\0" * 600))
    assert not caller.disconnecting
    caller.send(h2.frame(TYPE_CONTINUATION, 0, 1, b"\0" * 600))
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)
    assert not h.tunnels["alpha"].upstreams


def test_header_block_decoding_past_the_block_limit_is_enhance_your_calm():
    h = harness(max_header_block=4000)
    h.client()
    caller = h.caller()
    # A small block that expands: one indexed field repeated from the dynamic table.
    caller.headers(1, request(extra=[(b"x-fill", b"v" * 1000)]))
    caller.headers(3, request(extra=[(b"x-fill", b"v" * 1000)] * 5))
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)


def test_table_size_update_beyond_our_setting_is_compression_error():
    h = harness(header_table_size=4096)
    caller = h.caller()
    caller.encoder.header_table_size = 8192
    caller.call(1)
    closed_with(caller, ERROR_COMPRESSION_ERROR)


def test_table_size_update_within_our_setting_is_accepted():
    h = harness(header_table_size=4096)
    h.client()
    caller = h.caller()
    caller.encoder.header_table_size = 1024
    caller.call(1)
    assert not caller.disconnecting
    assert h.tunnels["alpha"].upstream.headers_frames(1)


def test_undecodable_header_block_is_compression_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff\xff"))
    closed_with(caller, ERROR_COMPRESSION_ERROR)


def test_headers_with_padding_and_priority_are_read():
    h = harness()
    h.client()
    caller = h.caller()
    block = Encoder().encode(request())
    payload = bytes([3]) + b"\0\0\0\0\x10" + block + b"\0\0\0"
    caller.send(h2.frame(TYPE_HEADERS, FLAG_END_HEADERS | 0x8 | 0x20, 1, payload))
    assert h.tunnels["alpha"].upstream.headers_frames(1)


def test_padding_longer_than_the_frame_is_protocol_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.frame(TYPE_DATA, 0x8, 1, bytes([5]) + b"abc"))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


# -- flow control (section 5.2, 6.9) ---------------------------------------------


def test_data_beyond_the_stream_window_is_flow_control_error():
    h = harness(initial_window=1000)
    h.client(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])  # nothing is forwarded
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, b"x" * 1000))
    assert not only(caller.frames(), TYPE_RST_STREAM)
    caller.send(h2.data(1, b"x"))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_FLOW_CONTROL_ERROR
    assert not caller.disconnecting
    upstream_resets = only(h.tunnels["alpha"].upstream.frames(), TYPE_RST_STREAM, 1)
    assert upstream_resets, "the upstream stream is cancelled too"


def test_padding_is_credited_at_once_and_data_once_forwarded():
    h = harness(initial_window=400)
    h.client(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    caller = h.caller()
    caller.call(1)
    caller.frames()
    caller.send(h2.data(1, b"abc", pad=250))
    (credit,) = only(caller.frames(), TYPE_WINDOW_UPDATE, 1)
    assert credit.increment == 251  # the pad length byte and the padding
    upstream = h.tunnels["alpha"].upstream
    upstream.frames()
    upstream.send(h2.window_update(1, 1000))
    assert [f.payload for f in only(upstream.frames(), TYPE_DATA, 1)] == [b"abc"]


def test_connection_window_overflow_is_flow_control_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.window_update(0, MAX_WINDOW - 65535))
    assert not caller.disconnecting
    caller.send(h2.window_update(0, 1))
    closed_with(caller, ERROR_FLOW_CONTROL_ERROR)


def test_stream_window_overflow_is_a_stream_flow_control_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.window_update(1, MAX_WINDOW - 65535 + 1))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_FLOW_CONTROL_ERROR
    assert not caller.disconnecting


def test_window_update_of_zero_on_the_connection_is_protocol_error():
    h = harness()
    caller = h.caller()
    caller.send(h2.window_update(0, 0))
    closed_with(caller, ERROR_PROTOCOL_ERROR)


def test_window_update_of_zero_on_a_stream_is_a_stream_protocol_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.window_update(1, 0))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_PROTOCOL_ERROR
    assert not caller.disconnecting


def test_settings_initial_window_overflowing_a_stream_is_flow_control_error():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.window_update(1, MAX_WINDOW - 65535))
    caller.send(h2.settings((SETTINGS_INITIAL_WINDOW_SIZE, 65536)))
    closed_with(caller, ERROR_FLOW_CONTROL_ERROR)


class _Sink:
    """A stream handler that forwards nothing and credits all it gets."""

    def stream_data(self, stream, data, end_stream):
        stream.connection.credit(stream, len(data))

    def stream_reset(self, stream, code):
        pass


def test_connection_window_is_credited_on_receipt():
    """1 GiB on one stream: the connection window comes back as the bytes arrive."""
    connection = H2Connection(H2Config(control_rate=0.001), Clock(), is_client=False,
                              on_new_stream=lambda c, s, headers, end: _Sink())
    transport = StringTransport()
    connection.makeConnection(transport)
    reader = h2.FrameReader(transport)
    connection.dataReceived(PREFACE + h2.settings()
                            + h2.headers(Encoder(), 1, request()))
    chunk = h2.data(1, b"\0" * 16384)
    for _ in range(2**30 // 16384):
        connection.dataReceived(chunk)
    updates = only(reader.read(), TYPE_WINDOW_UPDATE, 0)
    assert [u.increment for u in updates] == [MAX_WINDOW - 65535, 2**30]
    assert not connection.closed


# -- floods and caps ---------------------------------------------------------


@pytest.mark.parametrize("name, flood", [
    ("PING", h2.ping()),
    ("SETTINGS", h2.settings()),
    ("WINDOW_UPDATE", h2.window_update(0, 1)),
    ("PRIORITY", h2.frame(TYPE_PRIORITY, 0, 1, b"\0\0\0\0\x10")),
    ("unknown type", h2.frame(0x42, 0, 0, b"")),
])
def test_control_frame_flood_is_enhance_your_calm(name, flood):
    h = harness(control_burst=50, **CALM)
    caller = h.caller()  # its SETTINGS took one
    caller.send(flood * 48)
    assert not caller.disconnecting
    caller.send(flood * 2)
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)


def test_ping_flood_gets_no_more_answers_than_the_burst():
    h = harness(control_burst=20, **CALM)
    caller = h.caller()
    caller.send(h2.ping() * 1000)
    answers = [f for f in only(caller.frames(), TYPE_PING) if f.ack]
    assert len(answers) <= 20
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)


def test_empty_data_flood_is_enhance_your_calm():
    h = harness(control_burst=20, **CALM)
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, b"") * 30)
    closed_with(caller, ERROR_ENHANCE_YOUR_CALM)


def test_control_rate_refills_with_time():
    now = [0.0]
    connection = H2Connection(H2Config(control_burst=10, control_rate=10), Clock(),
                              is_client=False, now=lambda: now[0])
    connection.makeConnection(StringTransport())
    connection.dataReceived(PREFACE + h2.settings() + h2.ping() * 9)
    now[0] += 1.0
    connection.dataReceived(h2.ping() * 10)
    assert not connection.closed
    connection.dataReceived(h2.ping())
    assert connection.closed


def test_concurrent_stream_cap_is_refused_stream():
    h = harness(max_concurrent_streams=2)
    h.client()
    caller = h.caller()
    caller.call(1)
    caller.call(3)
    caller.call(5)
    (refused,) = only(caller.frames(), TYPE_RST_STREAM)
    assert (refused.stream_id, refused.error_code) == (5, ERROR_REFUSED_STREAM)
    assert len(h.tunnels["alpha"].upstream.headers_frames()) == 2
    assert not caller.disconnecting


def test_refused_stream_keeps_the_header_table_in_step():
    h = harness(max_concurrent_streams=1)
    h.client()
    caller = h.caller()
    caller.call(1, extra=[(b"x-a", b"1")])
    caller.call(3, extra=[(b"x-b", b"2")])  # refused, but its fields enter the table
    caller.send(h2.rst_stream(1, 8))
    caller.call(5, extra=[(b"x-b", b"2")])  # indexed from the table
    upstream = h.tunnels["alpha"].upstream
    assert [f.header(b"x-b") for f in upstream.headers_frames()] == [[], [b"2"]]


def test_idle_connection_is_closed_after_idle_timeout():
    h = harness(idle_timeout=30)
    caller = h.caller()
    h.clock.advance(29)
    assert not caller.disconnecting
    h.clock.advance(1)
    closed_with(caller, ERROR_NO_ERROR)


def test_connection_stuck_in_a_header_block_is_closed_when_idle():
    h = harness(idle_timeout=30)
    caller = h.caller()
    caller.send(h2.frame(TYPE_HEADERS, 0, 1, Encoder().encode(request())[:5]))
    h.clock.advance(30)
    closed_with(caller, ERROR_NO_ERROR)


def test_goaway_from_the_caller_lets_its_streams_finish():
    h = harness()
    h.client()
    caller = h.caller()
    caller.call(1, end_stream=True)
    caller.send(h2.goaway(1))
    assert not caller.disconnecting
    h.tunnels["alpha"].upstream.respond(1, b"r")
    assert only(caller.frames(), TYPE_DATA, 1) and caller.disconnecting


def test_connection_with_a_stream_is_not_idle():
    h = harness(idle_timeout=30)
    h.client()
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.clock.advance(60)
    assert not caller.disconnecting
    h.tunnels["alpha"].upstream.respond(1)
    h.clock.advance(29)
    assert not caller.disconnecting
    h.clock.advance(1)
    closed_with(caller, ERROR_NO_ERROR)
