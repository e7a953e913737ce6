"""Hypothesis: whatever a client writes on its first stream, the server handshake holds.

Random bytes, mutated Hellos and legacy id lines go through a real yamux session pair
(in memory), cut into random chunks.  Nothing raises out of ``dataReceived``, nothing
past the caps is buffered, and once the client closes its stream the handshake has
either produced one hello (accepted or rejected, as the server would) or failed once.
"""

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import (
    MAGIC,
    MAX_ID_LINE,
    MAX_MESSAGE_SIZE,
    WIRE_LEGACY,
    WIRE_NATIVE,
    MessageReader,
    ServerHandshake,
    encode_message,
)
from grpcmux.ids import client_id_problem
from grpcmux.testing import connected_sessions
from grpcmux.yamux.session import YamuxSession

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class _Only(Factory):
    """The server's stream factory: the handshake takes the first stream."""

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        protocol, self._protocol = self._protocol, None
        return protocol


class _Client(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class Run:
    """One client stream against a ServerHandshake that decides like the server."""

    def __init__(self):
        self.hellos = []
        self.failures = []
        self.handshake = ServerHandshake(self._hello, self._failed, self._inner)
        self.pair = connected_sessions(server_stream_factory=_Only(self.handshake))
        self.client = _Client()
        self.stream = self.pair.client.open_stream(self.client)

    def _inner(self):
        return YamuxSession(is_client=True, clock=self.pair.clock)

    def _hello(self, handshake, hello):
        self.hellos.append(hello)
        problem = client_id_problem(hello.client_id)
        if problem is None:
            handshake.accept(tunnel_pb2.Welcome(server_version="fuzz"))
        else:
            server = self.pair.server
            handshake.reject(tunnel_pb2.Reject.CODE_BAD_CLIENT_ID, problem,
                             lambda: self.pair.clock.callLater(0, server.close))

    def _failed(self, handshake, reason):
        self.failures.append(reason)
        self.pair.server.abort()

    def kept(self):
        return self.handshake.preamble_buffered, self.handshake.message_buffered


def check(chunks):
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    try:
        run = Run()
        for chunk in chunks:
            run.stream.write(chunk)
            run.pair.flush()
            line_or_early, message = run.kept()
            assert line_or_early <= max(MAX_ID_LINE, MAX_MESSAGE_SIZE)
            assert message <= 4 + MAX_MESSAGE_SIZE
        run.stream.loseConnection()  # the client gives up: the handshake must end
        run.pair.flush()
        run.pair.clock.advance(0)
        run.pair.flush()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures[0].getTraceback()
    assert len(run.hellos) + len(run.failures) == 1, (run.hellos, run.failures)
    data = b"".join(chunks)
    if run.hellos:
        (hello,) = run.hellos
        assert hello.wire_protocol == (WIRE_NATIVE if data[0] == 0 else WIRE_LEGACY)
        if hello.wire_protocol == WIRE_NATIVE:
            (body,) = MessageReader().feed(run.client.received)[:1]
            answer = tunnel_pb2.ServerMessage.FromString(body)
            expected = "welcome" if client_id_problem(hello.client_id) is None else "reject"
            assert answer.WhichOneof("kind") == expected
        else:
            assert hello.client_id.encode() + b"\n" == data[:data.index(b"\n") + 1]
    return run


def chunked(data_strategy):
    """(data, cut points) -> the data cut into chunks at those points."""

    @st.composite
    def build(draw):
        data = draw(data_strategy)
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
        bounds = [0] + cuts + [len(data)]
        return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

    return build()


def hello_bytes(client_id, labels, token):
    return MAGIC + encode_message(tunnel_pb2.Hello(client_id=client_id, labels=labels,
                                                   token=token, version="1"))


@st.composite
def mutated_hello(draw):
    data = bytearray(draw(st.builds(
        hello_bytes,
        st.text(max_size=40),
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        st.text(max_size=20),
    )))
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[position]
        elif action == "truncate":
            del data[position:]
    return bytes(data) or b"\x00"


legacy_line = st.builds(
    lambda text, newline, tail: text + (b"\n" if newline else b"") + tail,
    st.one_of(st.text(max_size=140).map(lambda t: t.encode("utf-8")), st.binary(max_size=600)),
    st.booleans(),
    st.binary(max_size=200),
).filter(lambda data: data[:1] not in (b"", b"\x00"))


@FUZZ
@given(chunked(st.binary(min_size=1, max_size=1200)))
def test_random_bytes(chunks):
    check(chunks)


@FUZZ
@given(chunked(mutated_hello()))
def test_mutated_hellos(chunks):
    check(chunks)


@FUZZ
@given(chunked(legacy_line))
def test_legacy_lines(chunks):
    check(chunks)


def test_a_valid_hello_is_admitted_and_answered():
    run = check([hello_bytes("lab-7", {"site": "b"}, "")])
    assert run.hellos[0].client_id == "lab-7"
