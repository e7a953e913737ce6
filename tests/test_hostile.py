"""Hostile peers against a running server: each one is cut off, logged and bounded.

Every scenario runs against a real server and proxy (``tests/mux_stack.py``) with a
well-behaved client ``good`` connected.  The attacker is a raw TCP connection that
writes yamux (or not) by hand.  Each test checks that

- the server closes the attacker's connection;
- the server logs it, naming the attacker's address (its loopback port);
- a call through the proxy to ``good`` succeeds while the attacker is connected, and
  again after it is gone;
- what the server holds for the attacker stays under ``BOUND``: the bytes buffered in
  its session (partial header, queued control frames), its handshake (id line or
  Hello), its streams (receive and send buffers) and its TCP write buffer, sampled
  after every read the server makes from it.

The proxy cases (metadata floods) check what grpcio does with them, that nothing is
routed, and that the next call succeeds.
"""

import random

import grpc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import MAGIC, encode_message
from grpcmux.testing import build_frame, data_frame, go_away_frame, ping_frame, window_update
from grpcmux.yamux import frame as f
from grpcmux.tuning import IO_SIZE
from mux_stack import TIMEOUT, Stack
from rpc_backend import route

# Nothing a single peer makes the server hold may exceed this: a full TCP write buffer
# (IO_SIZE) plus the answers to one read of IO_SIZE bytes of pings, plus one handshake
# message (64 KiB).  (Data streams, which may each hold a --stream-window, are opened
# by the server only for calls routed to a client; no call goes to an attacker here.)
BOUND = 2 * IO_SIZE + 64 * 1024
OK = grpc.StatusCode.OK
SYN = f.FLAG_SYN


def held(connection):
    """Bytes the server holds for one client connection right now."""
    handshake = connection.handshake
    total = handshake.preamble_buffered + handshake.message_buffered
    for session in (connection.session, connection.inner_session):
        if session is None:
            continue
        total += session.parser.buffered + session.sender.queued_control_bytes()
        for stream in list(session.streams.values()):
            total += stream.receive_buffered + stream.send_buffered
    transport = connection.session.transport
    # Twisted has no public count of what a transport buffers: read FileDescriptor's
    # own fields (the one private read left in the tests, of Twisted, not of ours).
    if transport is not None and hasattr(transport, "_tempDataLen"):
        total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return total


class Meter:
    """Samples ``held`` after every read of every connection the server accepts."""

    def __init__(self, server):
        self.peak = {}  # port of the peer -> most bytes held
        accept = server.connection_accepted

        def accepted(session, addr):
            accept(session, addr)
            connection = next(c for c in server.connections if c.session is session)
            receive = session.dataReceived

            def data_received(data):
                receive(data)
                self.peak[addr.port] = max(self.peak.get(addr.port, 0), held(connection))

            session.dataReceived = data_received

        server.connection_accepted = accepted


class Attacker(Protocol):
    """A raw connection; ``closed`` fires when the server drops it."""

    def __init__(self, reads=True):
        self.reads = reads
        self.received = bytearray()
        self.closed = Deferred()

    def connectionMade(self):
        self.port = self.transport.getHost().port  # the server sees 127.0.0.1:<port>
        if not self.reads:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.closed.callback(None)


@pytest.fixture
def warnings():
    """Warnings and errors logged during the test."""
    events = []

    def observe(event):
        level = event.get("log_level")
        if level is not None and level.name in ("warn", "error", "critical"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def names(event, port):
    """Whether a log event names the peer at 127.0.0.1:``port``."""
    peer = event.get("peer")
    return event.get("remote_address") == f"127.0.0.1:{port}" or (
        getattr(peer, "host", None) == "127.0.0.1" and getattr(peer, "port", None) == port)


class Scene:
    """A server with ``good`` connected, a meter, and a way to send attackers in."""

    def __init__(self, stack, warnings):
        self.stack = stack
        self.warnings = warnings
        self.meter = Meter(stack.server)

    async def start(self):
        await self.stack.connected_client("good")
        await self.call_good()

    async def call_good(self):
        result = await self.stack.invoke("Unary", b"still here", route("good"))
        assert (result.code, result.responses) == (OK, [b"still here"]), result.details

    async def attack(self, payload=b"", reads=True):
        """Connect an attacker, show that ``good`` is served, then send ``payload``."""
        host, port = self.stack.multiplexer_address.split(":")
        endpoint = TCP4ClientEndpoint(self.stack.reactor, host, int(port))
        attacker = await connectProtocol(endpoint, Attacker(reads)).addTimeout(
            TIMEOUT, self.stack.reactor)
        await self.call_good()  # during
        if payload:
            attacker.transport.write(payload)
        return attacker

    def logged(self, text):
        """A Deferred that fires once a warning containing ``text`` is logged."""
        seen = Deferred()

        def observe(event):
            if text in event.get("log_format", "").format(**event) and not seen.called:
                globalLogPublisher.removeObserver(observe)
                seen.callback(None)

        for event in self.warnings:
            observe(event)
        if not seen.called:
            globalLogPublisher.addObserver(observe)
        return seen.addTimeout(TIMEOUT, self.stack.reactor)

    async def cut_off(self, attacker, logged):
        """The attacker is disconnected, logged, bounded; ``good`` still served."""
        await attacker.closed.addTimeout(TIMEOUT, self.stack.reactor)
        mine = [e for e in self.warnings if names(e, attacker.port)]
        texts = [e.get("log_format", "").format(**e) for e in mine]
        assert any(logged in text for text in texts), texts
        assert self.meter.peak.get(attacker.port, 0) <= BOUND
        assert not any(c.remote_address == f"127.0.0.1:{attacker.port}"
                       for c in self.stack.server.connections)
        await self.call_good()  # after
        return texts


@pytest_twisted.async_yield_fixture
async def scene(reactor, tmp_path, warnings):
    stack = Stack(reactor, tmp_path)
    s = Scene(stack, warnings)
    await s.start()
    yield s
    await stack.stop()


def syn(stream_id=1):
    return window_update(stream_id, flags=SYN)


def hello(client_id):
    return syn() + data_frame(1, MAGIC + encode_message(tunnel_pb2.Hello(client_id=client_id)))


@pytest_twisted.ensureDeferred
async def test_random_bytes(scene):
    noise = random.Random(5).randbytes(64 * 1024)
    assert noise[0] != 0  # not yamux version 0
    attacker = await scene.attack(noise)
    await scene.cut_off(attacker, "yamux protocol error from")


@pytest_twisted.ensureDeferred
async def test_valid_yamux_with_a_garbage_hello(scene):
    attacker = await scene.attack(syn() + data_frame(1, MAGIC + b"\x00\x00\x00\x05" + b"\xff" * 5))
    await scene.cut_off(attacker, "failed: Hello is not a valid protobuf message")


@pytest_twisted.ensureDeferred
async def test_a_hello_announcing_a_huge_length(scene):
    attacker = await scene.attack(syn() + data_frame(1, MAGIC + b"\xff\xff\xff\xff" + b"x" * 100))
    await scene.cut_off(attacker, "a handshake message of 4294967295 bytes exceeds the limit")


@pytest_twisted.ensureDeferred
async def test_a_legacy_id_line_of_a_mebibyte_without_newline(scene):
    line = b"a" * (1 << 20)
    frames = [data_frame(1, line[i:i + 16384]) for i in range(0, len(line), 16384)]
    attacker = await scene.attack(syn() + b"".join(frames))
    await scene.cut_off(attacker, "legacy id line longer than 513 bytes without a newline")


@pytest.mark.parametrize(
    "first_stream, logged",
    [
        (b"\xff\xfe\xfd\n", "legacy id line is not valid UTF-8"),
        # A Hello of 4 bytes: field 1 (client_id), 2 bytes that are not UTF-8.
        (MAGIC + b"\x00\x00\x00\x04" + b"\x0a\x02\xff\xfe",
         "Hello is not a valid protobuf message"),
    ],
    ids=["legacy", "native"],
)
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_ids(scene, first_stream, logged):
    attacker = await scene.attack(syn() + data_frame(1, first_stream))
    await scene.cut_off(attacker, logged)
    assert set(scene.stack.registry.snapshot) == {"good"}


@pytest_twisted.ensureDeferred
async def test_ten_thousand_syns_without_data(scene):
    syns = b"".join(syn(stream_id) for stream_id in range(3, 20003, 2))
    attacker = await scene.attack(hello("greedy") + syns)
    await scene.cut_off(attacker, "opened a second stream; closing its session")
    frames = bytes(attacker.received)
    assert frames.count(bytes([0, f.TYPE_GO_AWAY])) == 1  # GoAway(protocol error), once
    assert set(scene.stack.registry.snapshot) == {"good"}


@pytest_twisted.ensureDeferred
async def test_a_window_overrun(scene):
    overrun = build_frame(f.TYPE_DATA, 0, 1, scene.stack.settings.stream_window + 1) + b"x" * 1000
    attacker = await scene.attack(syn() + overrun)
    await scene.cut_off(attacker, "exceed the receive window")


@pytest_twisted.ensureDeferred
async def test_one_byte_at_a_time(reactor, tmp_path, warnings):
    # A short deadline instead of 10 s; the trickle comes faster than the deadline.
    stack = Stack(reactor, tmp_path, settings={"handshake_timeout": 2.0})
    scene = Scene(stack, warnings)
    try:
        await scene.start()
        attacker = await scene.attack(syn())
        trickle = LoopingCall(lambda: attacker.transport.write(data_frame(1, b"a")))
        trickle.clock = reactor
        trickle.start(0.05)
        try:
            await scene.cut_off(attacker, "no handshake from 127.0.0.1:")
        finally:
            trickle.stop()
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_a_ping_flood_from_a_peer_that_does_not_read(reactor, tmp_path, warnings):
    # The server answers pings while the peer reads; once its answers back up it stops
    # reading, and its own keepalive ping, unanswered, ends the session (short here).
    stack = Stack(reactor, tmp_path, settings={"keepalive_interval": 0.5,
                                               "keepalive_timeout": 3.0})
    scene = Scene(stack, warnings)
    try:
        await scene.start()
        flood = b"".join(ping_frame(i) for i in range(700_000))  # 8.4 MB of pings
        attacker = await scene.attack(hello("flood") + flood, reads=False)
        await scene.logged("unanswered, closing the session")
        # The server aborted; a peer that neither reads nor writes cannot notice.
        attacker.transport.resumeProducing()
        texts = await scene.cut_off(attacker, "unanswered, closing the session")
        assert any("keepalive ping to" in text for text in texts)
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_sessions_that_send_goaway_after_welcome_are_closed_and_counted(
        reactor, tmp_path, warnings):
    # Each attacker is admitted, sends GoAway, then just reads.  Left open after
    # being unlisted, such sessions would let more clients in than --max-clients.
    stack = Stack(reactor, tmp_path, settings={"max_clients": 3})
    scene = Scene(stack, warnings)
    try:
        await scene.start()
        for index in range(6):
            attacker = await scene.attack(hello(f"leaver-{index}"))
            await stack.registered(f"leaver-{index}")
            attacker.transport.write(bytes(go_away_frame()))
            await attacker.closed.addTimeout(TIMEOUT, reactor)  # the server closed it
            assert scene.meter.peak[attacker.port] <= BOUND
        assert len(stack.server.connections) == 1
        await stack.connected_client("late-1")
        await stack.connected_client("late-2")
        assert set(stack.registry.snapshot) == {"good", "late-1", "late-2"}
        await scene.call_good()
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_connections_beyond_max_handshakes_wait_for_a_place(reactor, tmp_path, warnings):
    stack = Stack(reactor, tmp_path, settings={"max_handshakes": 3,
                                               "handshake_timeout": 2.0})
    scene = Scene(stack, warnings)
    try:
        await scene.start()
        silent = [await scene.attack() for _ in range(3)]  # connect, then say nothing
        waiting = await scene.attack()  # connected in the kernel's backlog only
        late = stack.client("late")
        await scene.call_good()  # admitted clients are served meanwhile
        assert len(stack.server.connections) == 4  # good and the three silent ones
        assert "late" not in stack.registry.snapshot
        assert any("3 handshakes in progress, the most allowed" in e["log_format"].format(**e)
                   for e in warnings)
        for attacker in silent:  # their handshake deadline frees the places
            await scene.cut_off(attacker, "no handshake from 127.0.0.1:")
        await stack.admitted(late)
        await stack.registered("late")
        await scene.cut_off(waiting, "no handshake from 127.0.0.1:")
    finally:
        await stack.stop()


# -- the proxy endpoint ---------------------------------------------------------------


def no_channel_made(stack):
    return stack.proxy.router.upstream_clients() <= {"good"}


@pytest_twisted.ensureDeferred
async def test_a_call_with_ten_thousand_metadata_keys(scene):
    metadata = route("good") + tuple((f"k{i}", "v") for i in range(10000))
    result = await scene.stack.invoke("Unary", b"x", metadata)
    # The router refuses header lists past its limit before routing them.
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (result.code, result.details)
    assert no_channel_made(scene.stack)
    await scene.call_good()


@pytest_twisted.ensureDeferred
async def test_a_call_with_a_mebibyte_routing_key(scene):
    result = await scene.stack.invoke("Unary", b"x", route("g" * (1 << 20)))
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (result.code, result.details)
    assert result.details.startswith("request metadata of ")
    assert result.details.endswith(" bytes is larger than the limit of 65536")
    assert no_channel_made(scene.stack)
    await scene.call_good()
