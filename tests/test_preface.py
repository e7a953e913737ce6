"""Swapped ports and one-sided TLS are recognised from the first bytes (issue 14.6).

Units: the judges on byte samples, the guard on a StringTransport.  Over
loopback: a gRPC caller on the multiplexer endpoint, a multiplexer client on the
proxy endpoint, a TLS client on a plaintext multiplexer endpoint.
"""

import grpc
import pytest
import pytest_twisted
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from grpcmux import tls
from grpcmux.http2.frames import PREFACE
from grpcmux.preface import (
    PASS,
    PROXY_HINT,
    TLS_ALERT_PROTOCOL_VERSION,
    PrefaceGuard,
    Wrong,
    WrongEndpoint,
    judge_multiplexer_client,
    judge_multiplexer_server,
)
from grpcmux.yamux.frame import FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN, encode_header
from mux_stack import Stack, first_report
from rpc_backend import invoke

CLIENT_HELLO = bytes([0x16, 3, 1, 0, 0xC8, 1]) + bytes(40)  # a TLS record, handshake
SETTINGS = bytes([0, 0, 12, 4, 0, 0, 0, 0, 0]) + bytes(12)  # two settings, stream 0
YAMUX_SYN = encode_header(1, FLAG_SYN, 1, 0)


def texts(events):
    return [formatEvent(e) for e in events]


@pytest.mark.parametrize("tls_port, inside_tls, data, expected", [
    (False, False, YAMUX_SYN, PASS),
    (False, False, b"legacy-id\n", PASS),  # not ours to judge: the handshake does
    (False, False, PREFACE, "sent an HTTP/2 preface"),
    (False, False, b"PRI", None),  # could still be the preface
    (False, False, CLIENT_HELLO, "started TLS on the plaintext multiplexer endpoint"),
    (True, False, CLIENT_HELLO, PASS),
    (True, False, YAMUX_SYN, "sent plaintext to the TLS multiplexer endpoint"),
    (True, False, PREFACE, "sent an HTTP/2 preface"),
    (True, False, b"GET / HTTP/1.1\r\n", "sent something other than TLS to the TLS"),
    (True, True, b"legacy-id\n", PASS),
    (True, True, YAMUX_SYN, PASS),
    (True, True, PREFACE, "sent an HTTP/2 preface"),
])
def test_judge_multiplexer_client(tls_port, inside_tls, data, expected):
    verdict = judge_multiplexer_client(data, tls_port, inside_tls)
    if isinstance(expected, str) and expected != PASS:
        assert isinstance(verdict, Wrong) and verdict.message.startswith(expected)
    else:
        assert verdict == expected


def test_judge_multiplexer_server():
    assert judge_multiplexer_server(SETTINGS).message.startswith(
        "the server answered with HTTP/2: it is a proxy endpoint (--proxy-listener)")
    assert judge_multiplexer_server(SETTINGS[:8]) is None
    assert judge_multiplexer_server(TLS_ALERT_PROTOCOL_VERSION).message == (
        "the server speaks TLS: connect with --tls")
    assert judge_multiplexer_server(b"\x16\x03\x03\x00") .message.startswith("the server speaks")


def test_no_yamux_frame_a_server_sends_looks_like_http2():
    """A yamux header with flags FIN on stream 0 alone could; no yamux peer sends it."""
    for kind in range(4):
        for flags in (0, FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN | FLAG_FIN):
            for stream_id in (0, 1, 2, 2 ** 31 - 1):
                if flags == FLAG_FIN and stream_id == 0:
                    continue
                for length in (0, 6, 12, 2 ** 18):
                    header = encode_header(kind, flags, stream_id, length)
                    assert judge_multiplexer_server(header) == PASS, header


class Recorder(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.lost = reason


def test_guard_hands_over_the_bytes_it_held_and_then_steps_aside():
    inner = Recorder()
    guard = PrefaceGuard(inner, lambda data: judge_multiplexer_client(data, False))
    transport = StringTransport()
    guard.makeConnection(transport)
    assert inner.transport is transport  # the real transport: TLS names, producers
    guard.dataReceived(b"P")
    guard.dataReceived(b"OST")  # not the preface after all
    guard.dataReceived(b" /")
    assert inner.received == b"POST /"


def test_guard_closes_a_wrong_peer_with_its_reply(log_events):
    inner = Recorder()
    guard = PrefaceGuard(inner, lambda data: judge_multiplexer_client(data, False),
                         describe=lambda address: "peer")
    transport = StringTransport()
    guard.makeConnection(transport)
    guard.dataReceived(PREFACE)
    assert inner.received == b""
    assert inner.lost.check(WrongEndpoint)
    assert transport.disconnecting
    assert PROXY_HINT.encode() in transport.value()  # HTTP/2 GOAWAY debug data
    assert texts(log_events) == [f"peer sent an HTTP/2 preface: {PROXY_HINT}; closing"]
    guard.connectionLost(None)  # the transport's own report changes nothing
    assert inner.lost.check(WrongEndpoint)


def test_guard_passes_a_short_first_write_on_close():
    inner = Recorder()
    guard = PrefaceGuard(inner, judge_multiplexer_server)
    guard.makeConnection(StringTransport())
    guard.dataReceived(b"\x00\x01")
    guard.connectionLost(None)
    assert inner.received == b"\x00\x01" and inner.lost is None


# -- over loopback ---------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def stack(reactor, tmp_path):
    s = Stack(reactor, tmp_path)
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_a_grpc_caller_on_the_multiplexer_endpoint_is_told_where_to_go(stack, log_events):
    channel = grpc.insecure_channel(stack.multiplexer_address)
    try:
        # grpc retries a call refused by GOAWAY until its deadline, transparently
        result = await stack.in_thread(invoke, channel, "Unary", b"x", (), 1)
    finally:
        channel.close()
    assert result.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    lines = [t for t in texts(log_events) if "HTTP/2 preface" in t]
    assert lines and lines[0].startswith("127.0.0.1:")
    assert lines[0].endswith(f"sent an HTTP/2 preface: {PROXY_HINT}; closing")
    assert not [t for t in texts(log_events) if "invalid protocol version" in t]


@pytest_twisted.ensureDeferred
async def test_a_client_dialling_the_proxy_endpoint_is_told_so(stack, log_events):
    stack.multiplexer_address = f"127.0.0.1:{stack.proxy.port}"
    client = stack.client("lost")
    problem = await first_report(client)
    assert problem == (
        f"multiplexer {stack.multiplexer_address} refused client lost: the server answered "
        "with HTTP/2: it is a proxy endpoint (--proxy-listener); dial the server's "
        "multiplexer endpoint (--multiplexer-listener, default port 7602)")
    assert "legacy" not in " ".join(texts(log_events))


@pytest_twisted.ensureDeferred
async def test_a_tls_client_on_a_plaintext_endpoint_is_named(stack, pki, log_events):
    creator = tls.client_creator("localhost", pki.ca, None, None)
    problem = await first_report(stack.client("secure", tls_creator=creator))
    assert problem == (f"TLS with multiplexer {stack.multiplexer_address} failed: TLS handshake "
                       "failed: wrong version number (the server does not speak TLS there: drop "
                       "--tls, or check the address); retrying")
    lines = [t for t in texts(log_events) if "started TLS" in t]
    assert lines and lines[0].endswith(
        " started TLS on the plaintext multiplexer endpoint: the client has --tls, this "
        "server has no --tls-cert; closing")
