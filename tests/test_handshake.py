"""Both wire handshakes, byte by byte, with StringTransport."""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import (
    MAGIC,
    MAX_ID_LINE,
    MAX_MESSAGE_SIZE,
    WIRE_LEGACY,
    WIRE_NATIVE,
    ClientHello,
    HandshakeFailed,
    HandshakeRejected,
    LegacyClientHandshake,
    MessageReader,
    NativeClientHandshake,
    ServerHandshake,
    encode_message,
)


class Recorder(Protocol):
    """An inner protocol that records what reaches it."""

    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.lost = reason


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class ServerSide:
    def __init__(self):
        self.hellos = []
        self.failures = []
        self.inner = Recorder()
        self.handshake = ServerHandshake(
            lambda hs, hello: self.hellos.append(hello),
            lambda hs, reason: self.failures.append(reason),
            lambda: self.inner,
        )
        self.transport = HalfCloseTransport()
        self.handshake.makeConnection(self.transport)

    def feed(self, data, one_byte_at_a_time=True):
        if one_byte_at_a_time:
            for i in range(len(data)):
                self.handshake.dataReceived(data[i:i + 1])
        else:
            self.handshake.dataReceived(data)


def hello_bytes(**fields):
    return MAGIC + encode_message(tunnel_pb2.Hello(**fields))


def test_message_reader_splits_and_bounds():
    reader = MessageReader(max_size=10)
    framed = encode_message(tunnel_pb2.Hello(client_id="a")) * 2
    assert reader.feed(framed[:3]) == []
    assert len(reader.feed(framed[3:])) == 2
    with pytest.raises(HandshakeFailed, match="exceeds the limit of 10"):
        reader.feed(b"\x00\x00\x00\x0b")


def test_native_hello_byte_by_byte():
    server = ServerSide()
    server.feed(hello_bytes(client_id="lab-7", version="0.1.0", token="t",
                            labels={"site": "b", "rack": "a"}))
    assert server.hellos == [
        ClientHello("lab-7", WIRE_NATIVE, (("rack", "a"), ("site", "b")), "t", "0.1.0")
    ]
    assert server.handshake.wire_protocol == WIRE_NATIVE


def test_native_accept_sends_welcome():
    server = ServerSide()
    server.feed(hello_bytes(client_id="x"), one_byte_at_a_time=False)
    assert server.handshake.accept(tunnel_pb2.Welcome(server_version="9")) is None
    reader = MessageReader()
    (body,) = reader.feed(server.transport.value())
    answer = tunnel_pb2.ServerMessage.FromString(body)
    assert answer.welcome.server_version == "9"


def test_native_reject_says_why_and_closes():
    server = ServerSide()
    server.feed(hello_bytes(client_id="x"), one_byte_at_a_time=False)
    closed = []
    server.handshake.reject(tunnel_pb2.Reject.CODE_ALREADY_EXISTS, "taken",
                            lambda: closed.append(True))
    assert closed == [] and server.transport.write_closed
    (body,) = MessageReader().feed(server.transport.value())
    answer = tunnel_pb2.ServerMessage.FromString(body)
    assert answer.reject.code == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    assert answer.reject.message == "taken"
    server.handshake.writeConnectionLost()  # the FIN went out after the Reject
    assert closed == [True]


def test_legacy_id_line_then_nested_session_gets_the_rest():
    server = ServerSide()
    server.feed(b"rainbow\n\x00\x01\x02")
    assert server.hellos == [ClientHello("rainbow", WIRE_LEGACY)]
    inner = server.handshake.accept(tunnel_pb2.Welcome())
    assert inner is server.inner
    assert server.inner.received == b"\x00\x01\x02"
    server.handshake.dataReceived(b"more")
    assert server.inner.received == b"\x00\x01\x02more"
    assert server.transport.value() == b""


def test_legacy_reject_just_closes():
    server = ServerSide()
    server.feed(b"rainbow\n")
    closed = []
    server.handshake.reject(tunnel_pb2.Reject.CODE_ALREADY_EXISTS, "taken",
                            lambda: closed.append(True))
    assert server.transport.value() == b""
    assert closed == [True]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x00GRPCMUY", "magic"),
        (MAGIC + b"\x7f\xff\xff\xff", "exceeds the limit"),
        (MAGIC + b"\x00\x00\x00\x03\xff\xff\xff", "not a valid protobuf"),
        (b"x" * MAX_ID_LINE, "without a newline"),
        (b"\xff\xfe\n", "not valid UTF-8"),
    ],
)
def test_bad_first_bytes_fail_once(data, why):
    server = ServerSide()
    server.feed(data, one_byte_at_a_time=False)
    server.feed(b"\n\n\n", one_byte_at_a_time=False)
    assert server.hellos == []
    assert len(server.failures) == 1
    assert why in server.failures[0]


def test_legacy_id_line_of_a_mebibyte_fails_without_buffering_it():
    server = ServerSide()
    chunk = b"y" * 4096
    for _ in range(256):
        server.feed(chunk, one_byte_at_a_time=False)
    assert len(server.failures) == 1
    assert server.handshake.preamble_buffered < MAX_ID_LINE


def buffered(handshake):
    """Bytes the handshake keeps between reads."""
    return handshake.preamble_buffered + handshake.message_buffered


@pytest.mark.parametrize(
    "data, why",
    [
        (b"y" * (1 << 20), "without a newline"),  # a 1 MiB id line in one read
        (MAGIC + b"\xff\xff\xff\xff" + b"z" * (1 << 20), "4294967295 bytes exceeds"),
    ],
    ids=["legacy-line", "hello-length"],
)
def test_oversized_preambles_fail_at_once_keeping_nothing_past_the_cap(data, why):
    server = ServerSide()
    server.feed(data, one_byte_at_a_time=False)
    assert len(server.failures) == 1 and why in server.failures[0]
    assert buffered(server.handshake) <= len(MAGIC)


def test_a_hello_is_refused_on_its_announced_length_before_its_body():
    server = ServerSide()
    server.feed(MAGIC + encode_message(tunnel_pb2.Hello(client_id="x" * MAX_MESSAGE_SIZE))[:4])
    assert "exceeds the limit of 65536" in server.failures[0]


def test_a_legacy_client_may_not_send_more_than_a_message_before_it_is_admitted():
    server = ServerSide()
    server.feed(b"early\n" + b"\x00" * MAX_MESSAGE_SIZE, one_byte_at_a_time=False)
    assert server.hellos and not server.failures
    server.feed(b"\x00", one_byte_at_a_time=False)
    assert server.failures == ["the client sent too much before it was admitted"]
    assert buffered(server.handshake) <= MAX_MESSAGE_SIZE


def test_bytes_after_a_native_hello_are_not_kept():
    server = ServerSide()
    server.feed(hello_bytes(client_id="x") + b"\x00" * 4096, one_byte_at_a_time=False)
    server.feed(b"\x01" * 4096, one_byte_at_a_time=False)
    assert server.hellos and not server.failures
    assert buffered(server.handshake) <= len(MAGIC) + 4096


def test_first_stream_closed_before_hello():
    server = ServerSide()
    server.feed(b"rain")
    server.handshake.connectionLost(Failure(ConnectionDone()))
    assert "before the handshake" in server.failures[0]


def client_side(**hello):
    fields = dict(client_id="lab-7", wire_protocol=WIRE_NATIVE)
    fields.update(hello)
    handshake = NativeClientHandshake(ClientHello(**fields))
    transport = StringTransport()
    handshake.makeConnection(transport)
    results = []
    handshake.result.addBoth(results.append)
    return handshake, transport, results


def test_client_sends_magic_and_hello():
    _, transport, _ = client_side(labels=(("site", "b"),), version="1")
    sent = transport.value()
    assert sent.startswith(MAGIC)
    (body,) = MessageReader().feed(sent[len(MAGIC):])
    hello = tunnel_pb2.Hello.FromString(body)
    assert (hello.client_id, dict(hello.labels), hello.version) == ("lab-7", {"site": "b"}, "1")


def test_client_welcome():
    handshake, _, results = client_side()
    answer = encode_message(tunnel_pb2.ServerMessage(welcome=tunnel_pb2.Welcome(server_version="v")))
    for i in range(len(answer)):
        handshake.dataReceived(answer[i:i + 1])
    assert results[0].server_version == "v"


def test_client_reject_carries_code_and_message():
    handshake, _, results = client_side()
    reject = tunnel_pb2.Reject(code=tunnel_pb2.Reject.CODE_BAD_CLIENT_ID, message="no spaces")
    handshake.dataReceived(encode_message(tunnel_pb2.ServerMessage(reject=reject)))
    error = results[0].value
    assert isinstance(error, HandshakeRejected)
    assert str(error) == "CODE_BAD_CLIENT_ID: no spaces"


def test_client_talking_to_a_legacy_server_gets_a_hint():
    handshake, _, results = client_side()
    # A legacy server answers an "id line" with a nested yamux SYN: not a message.
    handshake.dataReceived(bytes.fromhex("000101000000000100000000"))
    assert isinstance(results[0].value, HandshakeFailed)
    assert "--wire-protocol legacy" in str(results[0].value)


@pytest.mark.parametrize(
    "end, why",
    [
        (lambda hs: hs.connectionLost(Failure(ConnectionDone())), "closed the control stream"),
        (lambda hs: hs.timed_out(10), "no Welcome within 10 s"),
    ],
)
def test_client_without_answer(end, why):
    handshake, _, results = client_side()
    end(handshake)
    assert why in str(results[0].value)
    assert "--wire-protocol legacy" in str(results[0].value)


def test_legacy_client_writes_id_line_then_runs_inner_protocol():
    inner = Recorder()
    handshake = LegacyClientHandshake("rainbow", inner)
    transport = StringTransport()
    handshake.makeConnection(transport)
    assert transport.value() == b"rainbow\n"
    assert inner.transport is transport
    handshake.dataReceived(b"frames")
    assert inner.received == b"frames"
    handshake.connectionLost(Failure(ConnectionDone()))
    assert inner.lost is not None
