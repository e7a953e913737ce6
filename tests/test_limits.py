"""Every limit of the server, one by one: yamux streams, handshake deadline, clients, calls.

Units run on a StringTransport and a fake clock; the stream and call limits are also
checked through a real proxy.
"""


import grpc
import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.interfaces import IPushProducer
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import MAGIC
from grpcmux.registry import ClientRegistry
from grpcmux.accepting import HandshakeGate, SessionFactory
from grpcmux.config import ServerSettings
from grpcmux.server import MultiplexerServer
from grpcmux.testing import (
    RecorderFactory,
    StreamRecorder,
    data_frame,
    go_away_frame,
    ping_frame,
    read_frames,
    session_on_string_transport,
    window_update,
)
from grpcmux.yamux import frame as f
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import StreamLimitReached
from mux_stack import Stack
from server_peer import Peer, hello
from rpc_backend import ENGINES, Mux, route, start_call

SYN, ACK, FIN, RST = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_FIN, f.FLAG_RST
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
        assert len(session.streams) <= 100 and not session.sender.queued_control_bytes()
        resets += sum(frame.flags == RST for frame in read_frames(transport))
    assert len(factory.protocols) == 100
    assert resets == 9900
    assert not session.closed


# -- the server on a fake clock: handshake deadline, clients, extra streams -------------


def fake_server(tmp_path, reactor=None, **settings):
    reactor = reactor if reactor is not None else MemoryReactorClock()
    server = MultiplexerServer(reactor, ClientRegistry(), ServerSettings(
        multiplexer_listener=LOOPBACK, **settings))
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
    assert not server.connections


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


def test_a_departure_is_one_plain_line(tmp_path, log_events):
    _, server = fake_server(tmp_path)
    peer = Peer(server, 5006)
    peer.send(hello("leaver"))
    assert peer.answers()[0].WhichOneof("kind") == "welcome"
    peer.connection.connectionLost(Failure(ConnectionDone()))
    assert logged(log_events, "client leaver disconnected") == [
        "client leaver disconnected (connection was closed cleanly)"]


def welcomed(server, reactor, port, client_id):
    """A native peer admitted as ``client_id``."""
    peer = Peer(server, port)
    peer.send(hello(client_id))
    reactor.advance(0)
    assert [a.WhichOneof("kind") for a in peer.answers()] == ["welcome"]
    return peer


def refused_for_the_limit(server, reactor, port, client_id):
    peer = Peer(server, port)
    peer.send(hello(client_id))
    reactor.advance(0)
    reactor.advance(0)
    return [a.reject.code for a in peer.answers()] == [tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED]


def call_to(server, client_id, peer):
    """A stream the server opens to a client, as the proxy does for a call; acked."""
    stream = server.connected_clients[client_id].session.open_stream(StreamRecorder())
    peer.send(window_update(stream.stream_id, flags=ACK))
    return stream


def test_a_client_that_sent_goaway_counts_until_its_calls_end_then_is_closed(
        tmp_path, log_events):
    reactor, server = fake_server(tmp_path, max_clients=1, shutdown_grace=30.0)
    leaving = welcomed(server, reactor, 5001, "leaving")
    call = call_to(server, "leaving", leaving)
    leaving.send(go_away_frame())
    assert not server.registry.snapshot  # unlisted at once: nothing new goes to it
    assert not leaving.session.closed  # its call goes on ...
    assert refused_for_the_limit(server, reactor, 5002, "newcomer")  # ... and it counts
    reactor.advance(10)
    assert not leaving.session.closed
    call.loseConnection()  # the call ends (FIN both ways)
    leaving.send(window_update(call.stream_id, flags=FIN))
    reactor.advance(0.5)
    assert leaving.session.closed and leaving.transport.disconnecting
    assert logged(log_events, "client leaving has no calls left; closing its session")
    welcomed(server, reactor, 5003, "newcomer")


def test_a_client_that_sent_goaway_is_closed_after_the_grace_at_the_latest(
        tmp_path, log_events):
    reactor, server = fake_server(tmp_path, max_clients=1, shutdown_grace=5.0)
    stuck = welcomed(server, reactor, 5001, "stuck")
    call_to(server, "stuck", stuck)
    stuck.send(go_away_frame())
    reactor.advance(4.9)
    assert not stuck.session.closed
    assert refused_for_the_limit(server, reactor, 5002, "newcomer")
    reactor.advance(0.1)
    assert stuck.session.closed and stuck.transport.disconnected  # aborted
    assert logged(log_events, "client stuck from 127.0.0.1:5001 still carries 1 calls 5 s "
                              "after its GoAway; closing its session")
    welcomed(server, reactor, 5003, "newcomer")


def test_a_closed_connection_whose_peer_reads_nothing_is_aborted(tmp_path, log_events):
    # A StringTransport never completes a polite close: a peer that does not read.
    reactor, server = fake_server(tmp_path, keepalive_timeout=3.0)
    peer = welcomed(server, reactor, 5001, "deaf")
    peer.send(go_away_frame())  # no calls: the server closes the session ...
    assert peer.session.closed and peer.transport.disconnecting
    reactor.advance(2.9)
    assert not peer.transport.disconnected  # ... and waits for its bytes to be taken
    reactor.advance(0.1)
    assert peer.transport.disconnected  # then it aborts
    assert logged(log_events, "connection from 127.0.0.1:5001 still open 3 s after its "
                              "session closed (the peer reads nothing); aborting it")
    assert not server.lingering and not reactor.getDelayedCalls()


def test_goaway_right_after_welcome_closes_the_session_at_once(tmp_path):
    # The attack: Welcome, GoAway, then only answering pings.  Each such session,
    # left open uncounted, would let more clients in than the limit.
    reactor, server = fake_server(tmp_path, max_clients=2)
    for port in range(5001, 5011):
        peer = welcomed(server, reactor, port, f"leaver-{port}")
        peer.send(go_away_frame())
        assert peer.session.closed
    welcomed(server, reactor, 5100, "a")
    welcomed(server, reactor, 5101, "b")
    assert refused_for_the_limit(server, reactor, 5102, "c")


def test_a_legacy_client_sending_goaway_on_its_nested_session_is_closed_too(tmp_path):
    reactor, server = fake_server(tmp_path, max_clients=1)
    legacy = Peer(server, 5001)
    legacy.send(window_update(1, flags=SYN), data_frame(1, b"old\n"))
    assert "old" in server.registry.snapshot
    legacy.send(data_frame(1, go_away_frame()))  # on the nested session it runs
    assert legacy.session.closed and not server.registry.snapshot
    welcomed(server, reactor, 5002, "new")


@implementer(IPushProducer)
class ListeningPort:
    """Stands in for the listening port: records whether accepting is paused."""

    paused = False

    def pauseProducing(self):
        assert not self.paused
        self.paused = True

    def resumeProducing(self):
        assert self.paused
        self.paused = False

    def stopProducing(self):
        raise AssertionError("the port is never stopped this way")


def test_beyond_max_handshakes_connections_wait_until_one_finishes(tmp_path, log_events):
    reactor, server = fake_server(tmp_path, max_handshakes=2, handshake_timeout=10.0)
    server.port = ListeningPort()
    gate = HandshakeGate(server, SessionFactory(server))
    address = IPv4Address("TCP", "127.0.0.1", 5003)
    silent = Peer(server, 5001)
    silent.send(window_update(1, flags=SYN))
    assert not server.port.paused
    joining = Peer(server, 5002)
    assert server.port.paused  # the rest wait in the listen backlog
    assert gate.buildProtocol(address) is None  # one accepted in the same batch: closed
    assert logged(log_events, "2 handshakes in progress, the most allowed (--max-handshakes); "
                              "new connections wait until one finishes")
    joining.send(hello("joining"))  # admitted: no longer a handshake
    assert not server.port.paused and "joining" in server.registry.snapshot
    assert gate.buildProtocol(address) is not None
    assert server.port.paused
    reactor.advance(10)  # the silent ones time out and free their places
    assert silent.session.closed and not server.port.paused
    assert len(logged(log_events, "handshakes in progress, the most allowed")) == 1
    # Refused and failed handshakes free their places too.
    duplicate = Peer(server, 5004)
    duplicate.send(hello("joining"))  # an id in use: its holder is pinged first
    broken = Peer(server, 5005)
    assert server.port.paused
    [ping] = [fr for fr in joining.received() if fr.type == f.TYPE_PING]
    joining.send(ping_frame(ping.length, flags=ACK))  # alive: the duplicate is refused
    reactor.advance(0)
    assert duplicate.session.closed and not server.port.paused
    broken.send(b"GET / HTTP/1.1\r\n")
    assert broken.session.closed and server.handshakes_in_progress == 0


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
    stack = Stack(reactor, tmp_path, settings={"max_streams_per_client": 1})
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
    mux = Mux(reactor, tmp_path, settings={"max_calls_per_client": 2}, **ENGINES[engine])
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
    mux = Mux(reactor, tmp_path, settings={"max_calls_per_client": 1}, **ENGINES[engine])
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
    mux = Mux(reactor, tmp_path, settings={"max_proxy_calls": 2}, **ENGINES[engine])
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
    from grpcmux.tap.server import make_service

    settings = ServerSettings(max_streams_per_client=8, max_proxy_calls=9,
                              max_calls_per_client=3)
    service = make_service(settings, reactor)
    assert service.multiplexer.settings is settings and service.proxy.settings is settings
    assert service.multiplexer.yamux_config.max_streams == 8
    assert (service.proxy.limits.max_calls, service.proxy.limits.max_calls_per_client) == (9, 3)
