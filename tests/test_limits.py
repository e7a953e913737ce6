"""Every limit of the server, one by one: yamux streams, handshake deadline, clients, calls.

Units run on a StringTransport and a fake clock; the stream and call limits are also
checked through a real proxy.
"""


import grpc
import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import MAGIC, MessageReader, encode_message
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer, _SessionFactory
from grpcmux.testing import (
    RecorderFactory,
    StreamRecorder,
    data_frame,
    read_frames,
    session_on_string_transport,
    window_update,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import StreamLimitReached
from mux_stack import Stack
from rpc_backend import ENGINES, Mux, route, start_call

SYN, ACK, RST = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_RST
LOOPBACK = "tcp:0:interface=127.0.0.1"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
TIMEOUT = 20.0


def logged(events, text):
    return [formatEvent(e) for e in events if text in formatEvent(e)]


# -- yamux: streams per session --------------------------------------------------------


def test_a_syn_beyond_max_streams_is_reset_and_logged_once(log_events):
    factory = RecorderFactory()
    session, transport, _ = session_on_string_transport(
        False, factory, YamuxConfig(max_streams=2))
    for stream_id in (1, 3, 5, 7):
        session.dataReceived(window_update(stream_id, flags=SYN))
    sent = [(frame.stream_id, frame.flags) for frame in read_frames(transport)]
    assert sent == [(1, ACK), (3, ACK), (5, RST), (7, RST)]
    assert sorted(session.streams) == [1, 3] and len(factory.protocols) == 2
    assert len(logged(log_events, "opened more than 2 streams; resetting the extra ones")) == 1
    session.dataReceived(window_update(1, flags=RST))  # a stream that ends frees its place
    session.dataReceived(window_update(9, flags=SYN))
    assert sorted(session.streams) == [3, 9]
    assert not session.closed


def test_opening_beyond_max_streams_fails_cleanly():
    session, _, _ = session_on_string_transport(True, None, YamuxConfig(max_streams=2))
    first = session.open_stream(StreamRecorder())
    session.open_stream(StreamRecorder())
    with pytest.raises(StreamLimitReached, match=r"2 streams are open.*max_streams"):
        session.open_stream(StreamRecorder())
    first.abortConnection()
    session.open_stream(StreamRecorder())
    assert len(session.streams) == 2 and not session.closed


def test_ten_thousand_syns_without_data_cost_at_most_max_streams():
    factory = RecorderFactory()
    session, transport, _ = session_on_string_transport(
        False, factory, YamuxConfig(max_streams=100))
    resets = 0
    for first in range(1, 20001, 200):  # 10,000 SYNs, 100 a read
        session.dataReceived(b"".join(
            window_update(stream_id, flags=SYN) for stream_id in range(first, first + 200, 2)))
        # Bound: 100 streams (one protocol each), no control frame left queued.
        assert len(session.streams) <= 100 and not session._control
        resets += sum(frame.flags == RST for frame in read_frames(transport))
    assert len(factory.protocols) == 100
    assert resets == 9900
    assert not session.closed


# -- the server on a fake clock: handshake deadline, clients, extra streams -------------


class Peer:
    """A client connection to ``server`` on a StringTransport; frames written by hand."""

    def __init__(self, server, port):
        address = IPv4Address("TCP", "127.0.0.1", port)
        self.session = _SessionFactory(server).buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.session.makeConnection(self.transport)
        self.frames = []

    def send(self, *frames):
        self.session.dataReceived(b"".join(frames))

    def received(self):
        self.frames += read_frames(self.transport)
        return self.frames

    def answers(self):
        """The server's messages on the control stream."""
        body = b"".join(fr.data for fr in self.received() if fr.type == f.TYPE_DATA)
        return [tunnel_pb2.ServerMessage.FromString(m) for m in MessageReader().feed(body)]


def hello(client_id):
    return window_update(1, flags=SYN) + data_frame(
        1, MAGIC + encode_message(tunnel_pb2.Hello(client_id=client_id)))


def fake_server(tmp_path, reactor=None, **kwargs):
    reactor = reactor if reactor is not None else MemoryReactorClock()
    server = MultiplexerServer(reactor, ClientRegistry(), LOOPBACK, **kwargs)
    return reactor, server


@pytest.mark.parametrize("preamble", [b"slow-client-id-" * 2, MAGIC + b"\x00\x00\x00\x30"])
def test_the_handshake_deadline_counts_from_accept_whatever_trickles_in(
        tmp_path, log_events, preamble):
    reactor, server = fake_server(tmp_path, handshake_timeout=10.0)
    peer = Peer(server, 5555)
    peer.send(window_update(1, flags=SYN))
    for second in range(10):  # one byte a second: each arrives, none buys time
        assert not peer.session.closed
        peer.send(data_frame(1, preamble[second:second + 1]))
        reactor.advance(1)
    assert peer.session.closed and peer.transport.disconnected  # aborted
    assert logged(log_events, "no handshake from 127.0.0.1:5555 within 10 s; closing")
    assert not server._connections


def test_beyond_max_clients_native_gets_resource_exhausted_legacy_is_dropped(tmp_path, log_events):
    reactor, server = fake_server(tmp_path, max_clients=1)
    first = Peer(server, 5001)
    first.send(hello("first"))
    assert first.answers()[0].WhichOneof("kind") == "welcome"

    native = Peer(server, 5002)
    native.send(hello("second"))
    reactor.advance(0)
    reactor.advance(0)
    (answer,) = native.answers()
    assert answer.reject.code == tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED
    assert answer.reject.message == (
        "the server has its maximum of 1 clients connected; try again later or another server")
    assert native.session.closed
    assert logged(log_events, "refused client 'second' from 127.0.0.1:5002: CODE_RESOURCE_EXHAUSTED")

    legacy = Peer(server, 5003)
    legacy.send(window_update(1, flags=SYN), data_frame(1, b"third\n"))
    reactor.advance(0)
    assert legacy.session.closed
    assert not [fr for fr in legacy.received() if fr.type == f.TYPE_DATA]
    assert logged(log_events, "refused client 'third' from 127.0.0.1:5003")
    assert set(server.registry.snapshot) == {"first"}

    first.session.abort()  # a place frees up
    again = Peer(server, 5004)
    again.send(hello("second"))
    assert again.answers()[0].WhichOneof("kind") == "welcome"
    assert set(server.registry.snapshot) == {"second"}


@pytest.mark.parametrize("admitted", [True, False])
def test_a_client_opening_a_second_stream_is_disconnected(tmp_path, log_events, admitted):
    _, server = fake_server(tmp_path)
    peer = Peer(server, 5005)
    peer.send(hello("greedy") if admitted else window_update(1, flags=SYN))
    peer.send(*(window_update(stream_id, flags=SYN) for stream_id in range(3, 20003, 2)))
    go_aways = [fr for fr in peer.received() if fr.type == f.TYPE_GO_AWAY]
    assert [fr.length for fr in go_aways] == [f.GO_AWAY_PROTOCOL_ERROR]
    assert peer.session.closed and not peer.session.streams
    assert not server.registry.snapshot
    assert logged(log_events, "from 127.0.0.1:5005 opened a second stream; closing its session")


# -- through the proxy ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stream_beyond_the_session_limit_fails_the_call_cleanly(reactor, tmp_path, log_events):
    # The control stream takes the only place: the router cannot open a data stream.
    stack = Stack(reactor, tmp_path, yamux_config=YamuxConfig(max_streams=1))
    try:
        await stack.connected_client("full")
        result = await stack.invoke("Unary", b"x", route("full"))
        assert result.code == grpc.StatusCode.UNAVAILABLE
        assert result.details.startswith("client 'full' is unavailable"), result.details
        assert logged(log_events, "cannot open a connection to client full: 1 streams are "
                            "open, the session's limit (max_streams)")
        assert "full" in stack.registry.snapshot  # the client itself stays connected
    finally:
        await stack.stop()


async def until(reactor, predicate):
    """Wait (on the reactor, never blocking it) until ``predicate()`` holds."""
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


async def hold_calls(mux, client_id, count):
    """Start ``count`` calls that wait in the backend until cancelled."""
    pending = []
    for _ in range(count):
        pending.append(await mux.in_thread(
            start_call, mux.channel, "Unary", b"w", route(client_id) + (("x-wait", "1"),), 30))
    records = [await mux.in_thread(mux.backend.next_call, 10) for _ in range(count)]
    return pending, records


async def release(mux, held):
    """Cancel the held calls and wait until the backend saw each one end."""
    pending, records = held
    for call in pending:
        call.cancel()
    for record in records:
        assert await mux.in_thread(record.ended.wait, 10)


async def call_beyond_two_held(mux, held_id, called_id):
    """Hold two calls to ``held_id``, then call ``called_id``: RESOURCE_EXHAUSTED.

    The held calls (for :func:`release`) and the refused call's details.
    """
    pending = await hold_calls(mux, held_id, 2)
    refused = await mux.invoke("Unary", b"x", route(called_id))
    assert refused.code == RESOURCE_EXHAUSTED
    return pending, refused.details


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest_twisted.ensureDeferred
async def test_calls_to_one_client_beyond_the_limit_are_refused(reactor, tmp_path, engine):
    mux = Mux(reactor, tmp_path, max_calls_per_client=2, **ENGINES[engine])
    try:
        mux.connect("busy")
        mux.connect("other")
        pending, details = await call_beyond_two_held(mux, "busy", "busy")
        assert details == (
            "client 'busy' already has 2 calls in progress, the most allowed; retry later")
        assert (await mux.invoke("Unary", b"y", route("other"))).responses == [b"y"]
        await release(mux, pending)
        await until(reactor, lambda: mux.service.router.calls_to("busy") == 0)
        assert (await mux.invoke("Unary", b"z", route("busy"))).responses == [b"z"]
    finally:
        await mux.stop()


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest_twisted.ensureDeferred
async def test_a_call_that_cannot_be_made_gives_its_slot_back(reactor, tmp_path, engine):
    mux = Mux(reactor, tmp_path, max_calls_per_client=1, **ENGINES[engine])
    try:
        mux.connect("edge", str(tmp_path / "no-backend-here.sock"))
        for _ in range(2):  # with its slot kept, the second would be RESOURCE_EXHAUSTED
            failed = await mux.invoke("Unary", b"b", route("edge"))
            assert failed.code == grpc.StatusCode.UNAVAILABLE
            assert mux.service.router.calls_to("edge") == 0
    finally:
        await mux.stop()


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest_twisted.ensureDeferred
async def test_calls_beyond_the_proxy_limit_are_refused(reactor, tmp_path, engine):
    mux = Mux(reactor, tmp_path, max_concurrent_calls=2, **ENGINES[engine])
    try:
        mux.connect("a")
        mux.connect("b")
        pending, details = await call_beyond_two_held(mux, "a", "b")
        assert details == "the proxy has 2 calls in progress, the most allowed; retry later"
        await release(mux, pending)
        for _ in range(int(TIMEOUT / 0.01)):  # grpc frees the places as the calls end
            result = await mux.invoke("Unary", b"y", route("b"))
            if result.code != RESOURCE_EXHAUSTED:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert result.responses == [b"y"]
    finally:
        await mux.stop()


def test_the_settings_reach_the_services(reactor):
    from grpcmux.config import ServerSettings
    from grpcmux.server import make_service

    service = make_service(ServerSettings(
        max_clients=7, max_streams_per_client=8, max_proxy_calls=9, max_calls_per_client=3),
        reactor)
    assert service.multiplexer.max_clients == 7
    assert service.multiplexer.yamux_config.max_streams == 8
    assert (service.proxy.limits.max_calls, service.proxy.limits.max_calls_per_client) == (9, 3)
