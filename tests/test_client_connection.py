"""grpcmux.client_connection: one client's connection at the server, state by state.

Every test runs the server on a StringTransport and a ``task.Clock``: the handshake
deadline, the duplicate-id ping and the drain after GoAway are clock advances.
"""

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.client_connection import ClientConnection, reason_text
from grpcmux.config import ServerSettings
from grpcmux.metrics import ServerMetrics
from grpcmux.registry import DISCONNECTED, ClientRegistry
from grpcmux.server import MultiplexerServer
from grpcmux.testing import StreamRecorder, data_frame, go_away_frame, ping_frame, window_update
from grpcmux.yamux import frame as f
from server_peer import Peer, hello

SYN, ACK, FIN = f.FLAG_SYN, f.FLAG_ACK, f.FLAG_FIN


def server_on_a_clock(**settings):
    clock = Clock()
    metrics = ServerMetrics()
    server = MultiplexerServer(clock, ClientRegistry(), ServerSettings(**{
        "handshake_timeout": 5.0, "duplicate_ping_timeout": 2.0, "shutdown_grace": 3.0,
        **settings}), metrics=metrics)
    return clock, server


def connection_of(server, peer):
    [connection] = [c for c in server.connections if c.session is peer.session]
    assert isinstance(connection, ClientConnection)
    return connection


def handshakes(server, outcome, reason=""):
    return server.metrics.registry.get_sample_value(
        "grpcmux_server_handshakes_total", {"outcome": outcome, "reason": reason}) or 0


def logged(events, text):
    return [formatEvent(e) for e in events if text in formatEvent(e)]


def kinds(peer):
    return [answer.WhichOneof("kind") for answer in peer.answers()]


def admitted(server, clock, port, client_id):
    peer = Peer(server, port)
    peer.send(hello(client_id))
    clock.advance(0)
    assert kinds(peer) == ["welcome"]
    return peer


# -- handshaking -------------------------------------------------------------------------


def test_a_native_hello_is_welcomed_listed_and_counted_once():
    clock, server = server_on_a_clock()
    peer = Peer(server, 5001)
    connection = connection_of(server, peer)
    assert server.handshakes_in_progress == 1 and connection.client_id is None
    peer.send(hello("edge"))
    [answer] = peer.answers()
    assert answer.welcome.keepalive_interval_ms == 30000
    assert connection.admitted and connection.tunnel is not None
    assert server.connected_clients == {"edge": connection}
    assert server.registry.get("edge").remote_address == "127.0.0.1:5001"
    assert server.tunnel_for("edge") is connection.tunnel
    assert server.handshakes_in_progress == 0 and handshakes(server, "accepted") == 1
    clock.advance(5.0)  # the handshake deadline no longer applies
    assert not peer.session.closed and handshakes(server, "timed_out") == 0


def test_a_legacy_id_line_is_admitted_on_the_nested_session():
    clock, server = server_on_a_clock()
    peer = Peer(server, 5001)
    peer.send(window_update(1, flags=SYN), data_frame(1, b"old-edge\n"))
    connection = connection_of(server, peer)
    assert connection.admitted and connection.inner_session is not None
    assert server.registry.get("old-edge").wire_protocol == "legacy"
    assert not [fr for fr in peer.received() if fr.type == f.TYPE_DATA and fr.stream_id == 1
                and fr.data.startswith(b"\x00")]  # no Welcome: a legacy client hears nothing
    connection.inner_session.close()  # the nested session ends the outer one
    assert peer.session.closed and not server.registry.snapshot


def test_a_refused_hello_gets_its_reason_then_the_session_closes(log_events):
    clock, server = server_on_a_clock()
    peer = Peer(server, 5001)
    peer.send(hello("two words"))
    [answer] = peer.answers()
    assert answer.reject.code == tunnel_pb2.Reject.CODE_BAD_CLIENT_ID
    assert not peer.session.closed  # the Reject goes out first ...
    clock.advance(0)
    assert peer.session.closed  # ... then the session closes
    assert not server.connections and server.handshakes_in_progress == 0
    assert handshakes(server, "rejected", "bad_client_id") == 1
    assert logged(log_events, "refused client 'two words' from 127.0.0.1:5001")


def test_no_hello_within_the_handshake_timeout_aborts_the_session(log_events):
    clock, server = server_on_a_clock(handshake_timeout=5.0)
    peer = Peer(server, 5001)
    peer.send(window_update(1, flags=SYN))
    clock.advance(4.9)
    assert not peer.session.closed
    clock.advance(0.1)
    assert peer.session.closed and peer.transport.disconnected  # aborted, not closed politely
    assert handshakes(server, "timed_out") == 1 and handshakes(server, "failed") == 0
    assert logged(log_events, "no handshake from 127.0.0.1:5001 within 5 s; closing")
    assert not server.connections and server.handshakes_in_progress == 0


def test_a_broken_handshake_fails_once_and_aborts():
    clock, server = server_on_a_clock()
    peer = Peer(server, 5001)
    peer.send(window_update(1, flags=SYN), data_frame(1, b"\x00BAD"))
    assert peer.session.closed and handshakes(server, "failed") == 1
    clock.advance(10)
    assert handshakes(server, "timed_out") == 0 and not clock.getDelayedCalls()


def test_a_second_stream_closes_the_session_with_a_protocol_error(log_events):
    clock, server = server_on_a_clock()
    peer = admitted(server, clock, 5001, "greedy")
    peer.send(window_update(3, flags=SYN))
    [goaway] = [fr for fr in peer.received() if fr.type == f.TYPE_GO_AWAY]
    assert goaway.length == f.GO_AWAY_PROTOCOL_ERROR
    assert logged(log_events, "client 'greedy' from 127.0.0.1:5001 opened a second stream")


# -- the duplicate-id challenge ------------------------------------------------------------


def test_a_duplicate_id_whose_holder_answers_the_ping_is_refused():
    clock, server = server_on_a_clock()
    holder = admitted(server, clock, 5001, "twin")
    holder.received()
    newcomer = Peer(server, 5002)
    newcomer.send(hello("twin"))
    assert kinds(newcomer) == []  # undecided while the holder is pinged
    [ping] = [fr for fr in holder.received() if fr.type == f.TYPE_PING]
    holder.send(ping_frame(ping.length, flags=ACK))
    clock.advance(0)
    [answer] = newcomer.answers()
    assert answer.reject.code == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    assert "'twin' is already connected" in answer.reject.message
    clock.advance(0)
    assert newcomer.session.closed and not holder.session.closed
    assert server.connected_clients["twin"] is connection_of(server, holder)


def test_a_duplicate_id_whose_holder_is_silent_replaces_it(log_events):
    clock, server = server_on_a_clock(duplicate_ping_timeout=2.0)
    holder = admitted(server, clock, 5001, "phoenix")
    events = []
    server.registry.subscribe(events.append)
    newcomer = Peer(server, 5002)
    newcomer.send(hello("phoenix"))
    clock.advance(1.9)
    assert kinds(newcomer) == [] and not holder.session.closed
    clock.advance(0.1)
    assert holder.session.closed  # aborted: it answered no ping
    assert kinds(newcomer) == ["welcome"]
    assert server.connected_clients["phoenix"] is connection_of(server, newcomer)
    assert [e.kind for e in events][:1] == [DISCONNECTED]
    assert logged(log_events, "client phoenix reconnected; replacing its unresponsive "
                              "session from 127.0.0.1:5001")


def test_a_second_newcomer_for_an_id_being_decided_is_refused_at_once():
    clock, server = server_on_a_clock()
    admitted(server, clock, 5001, "twin")
    first = Peer(server, 5002)
    first.send(hello("twin"))
    second = Peer(server, 5003)
    second.send(hello("twin"))
    assert [a.reject.code for a in second.answers()] == [tunnel_pb2.Reject.CODE_ALREADY_EXISTS]
    assert kinds(first) == []


# -- closed mid-handshake -----------------------------------------------------------------


def test_a_session_closed_before_its_hello_is_forgotten_with_its_deadline():
    clock, server = server_on_a_clock()
    peer = Peer(server, 5001)
    peer.send(window_update(1, flags=SYN))
    peer.connection.connectionLost(Failure(ConnectionLost()))
    assert peer.session.closed and not server.connections
    assert server.handshakes_in_progress == 0
    clock.advance(5.0)
    assert handshakes(server, "timed_out") == 0


def test_a_newcomer_that_leaves_while_its_id_is_decided_takes_nothing():
    clock, server = server_on_a_clock(duplicate_ping_timeout=2.0)
    holder = admitted(server, clock, 5001, "twin")
    newcomer = Peer(server, 5002)
    newcomer.send(hello("twin"))
    newcomer.connection.connectionLost(Failure(ConnectionLost()))
    clock.advance(2.0)  # the holder answered nothing: it is replaced ...
    assert holder.session.closed
    assert not server.connected_clients and not server.registry.snapshot  # ... by no one
    assert handshakes(server, "accepted") == 1  # the holder's only
    admitted(server, clock, 5003, "twin")  # the id is free


# -- leaving ------------------------------------------------------------------------------


def call_to(server, client_id, peer):
    """A stream the server opens to a client, as the proxy does for a call; acked."""
    stream = server.connected_clients[client_id].session.open_stream(StreamRecorder())
    peer.send(window_update(stream.stream_id, flags=ACK))
    return stream


def test_after_goaway_the_session_closes_once_its_calls_end(log_events):
    clock, server = server_on_a_clock(shutdown_grace=3.0)
    peer = admitted(server, clock, 5001, "leaving")
    call = call_to(server, "leaving", peer)
    connection = connection_of(server, peer)
    peer.send(go_away_frame())
    assert not server.connected_clients and "leaving" not in server.registry.snapshot
    assert connection.calls_in_flight() == 1
    clock.advance(0.5)
    assert not peer.session.closed
    call.loseConnection()
    peer.send(window_update(call.stream_id, flags=FIN))
    clock.advance(0.5)
    assert peer.session.closed and peer.transport.disconnecting  # closed politely
    assert logged(log_events, "client leaving has no calls left; closing its session")


def test_after_goaway_calls_get_the_shutdown_grace_at_most(log_events):
    clock, server = server_on_a_clock(shutdown_grace=3.0)
    peer = admitted(server, clock, 5001, "stuck")
    call_to(server, "stuck", peer)
    peer.send(go_away_frame())
    clock.advance(2.5)
    assert not peer.session.closed
    clock.advance(0.5)
    assert peer.session.closed and peer.transport.disconnected  # aborted
    assert logged(log_events, "client stuck from 127.0.0.1:5001 still carries 1 calls "
                              "3 s after its GoAway; closing its session")


def test_a_politely_closed_session_lingers_until_its_transport_is_gone():
    clock, server = server_on_a_clock(keepalive_timeout=4.0)
    peer = admitted(server, clock, 5001, "reader")
    peer.send(go_away_frame())  # no calls: closed at once, politely
    assert peer.session.closed and len(server.lingering) == 1
    peer.connection.connectionLost(Failure(ConnectionDone()))
    assert len(server.lingering) == 0


@pytest.mark.parametrize("reason, text", [
    (Failure(ConnectionDone()), "connection was closed cleanly"),
    ("replaced by a new connection", "replaced by a new connection"),
    (None, "closed"),
    ("TLS handshake failed", "TLS handshake failed"),
])
def test_reason_text(reason, text):
    assert reason_text(reason) == text
