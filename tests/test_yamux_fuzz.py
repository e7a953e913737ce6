"""Hypothesis: random and mutated frame sequences never break a session.

Whatever arrives, dataReceived does not raise, nothing unbounded is buffered,
and the session either keeps working or sends GoAway(PROTOCOL_ERROR) and closes
(or closes because the input itself carried an error GoAway).
"""

import random

from hypothesis import HealthCheck, given, settings, strategies as st

from grpcmux.testing import (
    HalfCloseRecorder,
    RecorderFactory,
    StreamRecorder,
    build_frame,
    connected_sessions,
    parse_frames,
    ping_frame,
    session_on_string_transport,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.config import YamuxConfig

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

frame_strategy = st.one_of(
    st.builds(
        lambda stream_id, flags, data: build_frame(f.TYPE_DATA, flags, stream_id, data=data),
        st.integers(0, 8), st.integers(0, 15), st.binary(max_size=300),
    ),
    st.builds(
        lambda stream_id, flags, delta: build_frame(f.TYPE_WINDOW_UPDATE, flags, stream_id, delta),
        st.integers(0, 8), st.integers(0, 15),
        st.one_of(st.integers(0, 1000), st.just(0xFFFFFFFF)),
    ),
    st.builds(lambda flags, value: build_frame(f.TYPE_PING, flags, 0, value),
              st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
    st.builds(lambda code: build_frame(f.TYPE_GO_AWAY, 0, 0, code), st.integers(0, 3)),
    st.builds(lambda length: build_frame(f.TYPE_DATA, 0, 1, length), st.integers(0, 1 << 32 - 1)),
)


class Misbehaving(HalfCloseRecorder):
    """A stream protocol that pauses, writes and closes as data arrives."""

    def dataReceived(self, data):
        super().dataReceived(data)
        action = len(self.data) % 5
        if action == 0:
            self.transport.pauseProducing()
        elif action == 1:
            self.transport.write(data[:10])
        elif action == 2:
            self.transport.resumeProducing()
        elif action == 3:
            self.transport.loseWriteConnection()

    def readConnectionLost(self):
        super().readConnectionLost()
        self.transport.loseConnection()


def run(chunks, is_client=False, protocol_class=StreamRecorder):
    factory = RecorderFactory(protocol_class)
    session, transport, clock = session_on_string_transport(
        is_client, factory, YamuxConfig(accept_backlog=4))
    if is_client:
        for _ in range(3):
            session.open_stream(protocol_class()).write(b"hello")
    for chunk in chunks:
        session.dataReceived(chunk)  # must never raise
        for stream in session.streams.values():
            assert stream.receive_buffered <= session.config.max_stream_window_size
        assert session.parser.buffered < f.HEADER_SIZE
        clock.advance(1)
    sent = parse_frames(transport.value())
    if session.closed:
        remote_error = any(fr.type == f.TYPE_GO_AWAY and fr.length != 0
                           for fr in _complete_frames(b"".join(chunks)))
        go_aways = [fr for fr in sent if fr.type == f.TYPE_GO_AWAY]
        assert remote_error or go_aways[-1].length == f.GO_AWAY_PROTOCOL_ERROR
        assert transport.disconnecting
    elif session.parser.at_frame_boundary:
        # Still working (and at a frame boundary): a ping is answered.
        transport.clear()
        session.dataReceived(ping_frame(424242))
        assert (f.TYPE_PING, f.FLAG_ACK, 424242) in [
            (fr.type, fr.flags, fr.length) for fr in parse_frames(transport.value())]
    session.abort()
    clock.advance(1000)


def _complete_frames(data):
    """The headers in ``data`` up to the first malformed one (for the oracle above)."""
    frames, pos = [], 0
    while len(data) - pos >= f.HEADER_SIZE:
        header = f.decode_header(data, pos)
        if header.version != 0 or header.type > 3:
            break
        frames.append(header)
        pos += f.HEADER_SIZE + (header.length if header.type == f.TYPE_DATA else 0)
    return frames


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for point in points + [len(data)]:
        pieces.append(data[prev:point])
        prev = point
    return [p for p in pieces if p]


@FUZZ
@given(st.lists(frame_strategy, max_size=25), st.lists(st.integers(0, 10000), max_size=6),
       st.booleans(), st.booleans())
def test_random_frame_sequences(frames, cuts, is_client, misbehave):
    data = b"".join(frames)
    run(split(data, cuts), is_client, Misbehaving if misbehave else StreamRecorder)


@FUZZ
@given(st.lists(frame_strategy, min_size=1, max_size=15), st.integers(0, 2 ** 32),
       st.integers(1, 8), st.lists(st.integers(0, 10000), max_size=6), st.booleans())
def test_mutated_frame_sequences(frames, seed, flips, cuts, is_client):
    data = bytearray(b"".join(frames))
    rng = random.Random(seed)
    for _ in range(flips):
        kind = rng.randrange(3)
        if kind == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)):][:rng.randrange(1, 13)]
        else:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 13)))
    run(split(bytes(data), cuts), is_client)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data):
    run([data])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["open", "write", "pause", "resume", "fin", "pump"]),
                          st.integers(0, 7), st.booleans(), st.integers(1, 150000)),
                max_size=40))
def test_random_operations_between_two_sessions_keep_every_byte(ops):
    """Random opens, writes, pauses and half-closes: each side reads exactly what was sent."""
    server_factory = RecorderFactory(HalfCloseRecorder)
    pair = connected_sessions(server_stream_factory=server_factory,
                              config=YamuxConfig(max_frame_size=8192))
    pairs = []  # (client protocol, server protocol or None, bytes sent each way)
    sent = {}
    finished = set()

    def ends(index):
        client_proto = pairs[index % len(pairs)]
        server_proto = server_factory.protocols[index % len(pairs)]
        return client_proto, server_proto

    for op, index, from_client, size in ops:
        if op == "open" or not pairs:
            proto = HalfCloseRecorder()
            pair.client.open_stream(proto)
            pairs.append(proto)
            pair.flush()
            continue
        client_proto, server_proto = ends(index)
        source, sink = (client_proto, server_proto) if from_client else (server_proto, client_proto)
        if op == "write":
            data = bytes([size % 251]) * size
            source.transport.write(data)
            if id(source) not in finished:  # writes after a half-close are dropped
                sent[id(source)] = sent.get(id(source), b"") + data
        elif op == "pause":
            sink.transport.pauseProducing()
        elif op == "resume":
            sink.transport.resumeProducing()
        elif op == "fin":
            source.transport.loseWriteConnection()
            finished.add(id(source))
        else:
            pair.flush()
    for index in range(len(pairs)):
        for proto in ends(index):
            proto.transport.resumeProducing()
        pair.flush()
    assert not pair.client.closed and not pair.server.closed
    for index in range(len(pairs)):
        client_proto, server_proto = ends(index)
        assert bytes(server_proto.data) == sent.get(id(client_proto), b"")
        assert bytes(client_proto.data) == sent.get(id(server_proto), b"")
    pair.client.close()
    pair.flush()
    assert pair.server.closed and pair.clock.getDelayedCalls() == []
