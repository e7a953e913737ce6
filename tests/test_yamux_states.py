"""Tests for the yamux stream's state enum and its one transition function."""

import pytest
from twisted.internet.protocol import Factory

from grpcmux.testing import (
    Frame,
    HalfCloseRecorder,
    StreamRecorder,
    data_frame,
    read_frames,
    session_on_string_transport,
    window_update,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import ProtocolError, SessionClosed
from grpcmux.yamux.stream import StreamState, transition

S = StreamState
SYN, ACK, FIN, RST = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_FIN, f.FLAG_RST
WU, GO = f.TYPE_WINDOW_UPDATE, f.TYPE_GO_AWAY
SENT, RECEIVED = True, False

# (state, flags, sent) -> next state: hashicorp/yamux stream.go's lifecycle.
TABLE = [
    (S.INIT, SYN, SENT, S.SYN_SENT),
    (S.INIT, SYN, RECEIVED, S.SYN_RECEIVED),
    (S.SYN_SENT, ACK, RECEIVED, S.ESTABLISHED),
    (S.SYN_RECEIVED, ACK, SENT, S.ESTABLISHED),
    (S.SYN_SENT, ACK, SENT, S.SYN_SENT),  # only the peer's ACK establishes what we opened
    (S.SYN_RECEIVED, ACK, RECEIVED, S.SYN_RECEIVED),
    (S.ESTABLISHED, ACK, RECEIVED, S.ESTABLISHED),
    (S.ESTABLISHED, SYN, RECEIVED, S.ESTABLISHED),
    (S.SYN_SENT, FIN, RECEIVED, S.REMOTE_CLOSE),  # a FIN before the ACK, as in Go
    (S.SYN_RECEIVED, FIN, RECEIVED, S.REMOTE_CLOSE),
    (S.ESTABLISHED, FIN, RECEIVED, S.REMOTE_CLOSE),
    (S.SYN_SENT, FIN, SENT, S.LOCAL_CLOSE),
    (S.ESTABLISHED, FIN, SENT, S.LOCAL_CLOSE),
    (S.LOCAL_CLOSE, FIN, RECEIVED, S.CLOSED),
    (S.REMOTE_CLOSE, FIN, SENT, S.CLOSED),
    (S.REMOTE_CLOSE, FIN, RECEIVED, S.REMOTE_CLOSE),  # a repeated FIN changes nothing
    (S.LOCAL_CLOSE, FIN, SENT, S.LOCAL_CLOSE),
    (S.SYN_RECEIVED, ACK | FIN, SENT, S.LOCAL_CLOSE),  # ACK applies before FIN
    (S.INIT, SYN | FIN, RECEIVED, S.REMOTE_CLOSE),  # SYN|FIN on DATA: opened and half-closed
    (S.SYN_SENT, ACK | FIN, RECEIVED, S.REMOTE_CLOSE),
    (S.CLOSED, FIN, RECEIVED, S.CLOSED),  # late frames of an ended stream move nothing
    (S.CLOSED, ACK, RECEIVED, S.CLOSED),
    (S.RESET, FIN, RECEIVED, S.RESET),
    (S.RESET, RST, RECEIVED, S.RESET),
    (S.ESTABLISHED, 0, RECEIVED, S.ESTABLISHED),
]


@pytest.mark.parametrize("state, flags, sent, expected", TABLE)
def test_transition_table(state, flags, sent, expected):
    assert transition(state, flags, sent) is expected


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("sent", [SENT, RECEIVED])
def test_rst_resets_from_every_state(state, sent):
    assert transition(state, RST, sent) is S.RESET
    assert transition(state, RST | FIN | ACK, sent) is S.RESET


def test_every_state_reaches_an_end_and_nothing_leaves_it():
    for state in S:
        for flags in range(16):
            for sent in (SENT, RECEIVED):
                after = transition(state, flags, sent)
                if state in (S.CLOSED, S.RESET):
                    assert after is state or after is S.RESET
                else:
                    assert after >= state or after is S.RESET, (state, flags, sent)


def opened(proto, **config):
    session, transport, clock = session_on_string_transport(
        True, None, YamuxConfig(enable_keepalive=False, **config))
    stream = session.open_stream(proto)
    return session, transport, clock, stream


def test_opened_stream_walks_the_states_to_closed():
    proto = HalfCloseRecorder()
    session, transport, clock, stream = opened(proto)
    assert stream.state is S.SYN_SENT and not stream.established
    session.dataReceived(window_update(1, 0, ACK))
    assert stream.state is S.ESTABLISHED and stream.established
    stream.loseWriteConnection()
    clock.advance(0)
    assert stream.state is S.LOCAL_CLOSE and proto.write_closed
    session.dataReceived(window_update(1, 0, FIN))
    assert stream.state is S.CLOSED and stream.disconnected and 1 not in session.streams


def test_accepted_stream_is_established_by_its_ack_and_half_closes_remotely():
    protocols = []

    class Factory_(Factory):
        def buildProtocol(self, addr):
            protocols.append(HalfCloseRecorder())
            return protocols[-1]

    session, transport, clock = session_on_string_transport(False, Factory_())
    session.dataReceived(window_update(1, 0, SYN))
    stream = session.streams[1]
    assert stream.state is S.ESTABLISHED
    assert read_frames(transport) == [Frame(WU, ACK, 1, 0)]
    session.dataReceived(data_frame(1, b"bye", FIN))
    assert stream.state is S.REMOTE_CLOSE and protocols[0].read_closed
    assert not stream.disconnected  # our side may still write
    stream.write(b"answer")
    stream.loseConnection()
    clock.advance(0)
    assert stream.state is S.CLOSED and stream.disconnected


def test_reset_both_ways():
    session, transport, _, stream = opened(StreamRecorder())
    session.dataReceived(window_update(1, 0, ACK | RST))
    assert stream.state is S.RESET and stream.disconnected
    second = session.open_stream(StreamRecorder())
    second.abortConnection()
    assert second.state is S.RESET
    assert read_frames(transport)[-1] == Frame(WU, RST, 3, 0)


def test_session_end_closes_its_streams():
    session, transport, _, stream = opened(StreamRecorder())
    session.abort()
    assert stream.state is S.CLOSED and stream.protocol.lost.check(SessionClosed)


# -- issue 14 item 11: a window is 32 bits ------------------------------------

def test_window_update_past_32_bits_is_a_protocol_error():
    session, transport, _, stream = opened(StreamRecorder())
    results = []
    session.when_closed().addCallback(results.append)
    transport.clear()
    # 256 KiB initial window + this delta = exactly 2**32 - 1: still fine.
    session.dataReceived(window_update(1, f.MAX_STREAM_WINDOW - f.INITIAL_STREAM_WINDOW, ACK))
    assert not session.closed and read_frames(transport) == []
    session.dataReceived(window_update(1, 1))
    assert read_frames(transport) == [Frame(GO, 0, 0, f.GO_AWAY_PROTOCOL_ERROR)]
    assert session.closed and transport.disconnecting
    assert isinstance(results[0], ProtocolError)
    assert stream.protocol.lost.check(SessionClosed)


def test_window_overflow_by_many_small_updates():
    session, transport, _, stream = opened(StreamRecorder())
    transport.clear()
    step = 1 << 30
    session.dataReceived(window_update(1, step, ACK) + window_update(1, step)
                         + window_update(1, step))
    assert not session.closed  # 256 KiB + 3 GiB
    session.dataReceived(window_update(1, step))
    assert session.closed
    assert read_frames(transport) == [Frame(GO, 0, 0, f.GO_AWAY_PROTOCOL_ERROR)]


def test_spent_window_may_be_granted_again_up_to_the_limit():
    # Sending spends the window, so a peer may grant up to 2**32 - 1 again.
    session, transport, clock, stream = opened(StreamRecorder())
    session.dataReceived(window_update(1, f.MAX_STREAM_WINDOW - f.INITIAL_STREAM_WINDOW, ACK))
    stream.write(b"x" * 100000)
    clock.advance(0)
    transport.clear()
    session.dataReceived(window_update(1, 100000))
    assert not session.closed
    session.dataReceived(window_update(1, 1))
    assert session.closed
