"""The whole product on loopback: calls through proxy, server, tunnel, client, backend."""

import queue
import socket

import grpc
import pytest
import pytest_twisted

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.tuning import IO_SIZE
from mux_stack import TIMEOUT, Stack, first_report
from rpc_backend import route

OK = grpc.StatusCode.OK


@pytest.mark.parametrize("wire_protocol", ["native", "legacy"])
@pytest.mark.parametrize(
    "kind, request_, expected",
    [
        ("Unary", b"ping", [b"ping"]),
        ("ServerStream", b"s", [b"s"] * 3),
        ("ClientStream", [b"a", b"b", b"c"], [b"a|b|c"]),
        ("Bidi", [b"x", b"y"], [b"x", b"y"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_four_call_kinds_through_the_tunnel(stack, wire_protocol, kind, request_, expected):
    await stack.connected_client("lab", wire_protocol=wire_protocol)
    result = await stack.invoke(kind, request_, route("lab") + (("x-count", "3"),))
    assert (result.code, result.responses) == (OK, expected), result.details
    call = stack.backend.next_call()
    assert "client-id" not in dict(call.metadata)


@pytest_twisted.ensureDeferred
async def test_status_headers_and_trailers_survive_the_tunnel(stack):
    await stack.connected_client("lab")
    result = await stack.invoke(
        "Unary",
        b"x",
        route("lab")
        + (("x-header-h", "1"), ("x-trailer-t", "2"), ("x-fail", "NOT_FOUND nothing here"),
           ("x-fail-details-bin", b"\x08\x05")),
    )
    assert result.code == grpc.StatusCode.NOT_FOUND
    assert result.details == "nothing here"
    assert ("h", "1") in result.headers
    assert ("grpc-status-details-bin", b"\x08\x05") in result.trailers


@pytest_twisted.ensureDeferred
async def test_64_mib_message_both_ways(stack):
    await stack.connected_client("lab")
    payload = bytes(range(256)) * (64 * 1024 * 4)
    result = await stack.invoke("Unary", payload, route("lab"))
    assert result.code == OK, result.details
    assert result.responses[0] == payload


@pytest_twisted.ensureDeferred
async def test_many_clients_each_reach_their_own_backend(stack, tmp_path):
    from rpc_backend import Backend

    backends = [Backend(str(tmp_path / f"b{i}.sock")) for i in range(3)]
    try:
        for i, backend in enumerate(backends):
            await stack.connected_client(f"c{i}", backend_address=f"unix:{backend.socket_path}")
        for i, backend in enumerate(backends):
            result = await stack.invoke("Unary", b"%d" % i, route(f"c{i}"))
            assert result.responses == [b"%d" % i]
            assert backend.next_call(timeout=5).method == "/test.Echo/Unary"
    finally:
        for backend in backends:
            await stack.in_thread(backend.stop)


@pytest_twisted.ensureDeferred
async def test_unknown_client_is_not_found(stack):
    result = await stack.invoke("Unary", b"x", route("nobody"))
    assert result.code == grpc.StatusCode.NOT_FOUND
    assert "client 'nobody' is not connected" in result.details


@pytest_twisted.ensureDeferred
async def test_cancel_reaches_the_backend_through_the_tunnel(stack):
    from rpc_backend import start_call

    await stack.connected_client("lab")
    pending = await stack.in_thread(start_call, stack.channel, "ServerStream", b"w",
                                    route("lab") + (("x-wait", "1"),), TIMEOUT)
    call = await stack.in_thread(stack.backend.next_call)
    pending.cancel()
    await stack.in_thread(call.settled.wait, TIMEOUT)
    assert call.outcome == "cancelled"


@pytest_twisted.ensureDeferred
async def test_deadline_reaches_the_backend(stack):
    await stack.connected_client("lab")
    result = await stack.invoke("Unary", b"x", route("lab"), timeout=7.0)
    assert result.code == OK
    remaining = stack.backend.next_call().time_remaining
    # grpc-timeout's encoding may round up at each hop (grpc core says so): allow a bit.
    assert remaining is not None and 0 < remaining <= 7.1


@pytest_twisted.ensureDeferred
async def test_tunnel_dying_mid_call_gives_unavailable_naming_the_client(stack):
    from rpc_backend import start_call

    client = await stack.connected_client("lab")
    pending = await stack.in_thread(start_call, stack.channel, "ServerStream", b"w",
                                    route("lab") + (("x-wait", "1"),), TIMEOUT)
    await stack.in_thread(stack.backend.next_call)
    client.tunnel.session.transport.abortConnection()
    result = await stack.in_thread(pending.finish)
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "lab" in result.details


@pytest_twisted.ensureDeferred
async def test_backend_down_then_up(stack, tmp_path):
    from rpc_backend import Backend

    path = str(tmp_path / "flaky.sock")
    await stack.connected_client("lab", backend_address=f"unix:{path}")
    result = await stack.invoke("Unary", b"x", route("lab"))
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "lab" in result.details
    backend = Backend(path)
    try:
        await stack.proxy_channel_ready("lab")
        result = await stack.invoke("Unary", b"x", route("lab"))
        assert (result.code, result.responses) == (OK, [b"x"]), result.details
    finally:
        await stack.in_thread(backend.stop)
    assert stack.server.connected_clients.keys() == {"lab"}


@pytest_twisted.ensureDeferred
async def test_client_reconnects_after_server_restart(stack):
    client = await stack.connected_client("lab")
    session = client.tunnel.session
    await stack.restart_server()
    await session.when_closed().addTimeout(TIMEOUT, stack.reactor)
    await stack.registered("lab")  # by the next session: the client saw the old one end
    assert await stack.admitted(client) is not session
    result = await stack.invoke("Unary", b"again", route("lab"), wait_for_ready=True)
    assert result.responses == [b"again"], result.details


def discovery(stack):
    return discovery_pb2_grpc.DiscoveryServiceStub(stack.channel)


@pytest_twisted.ensureDeferred
async def test_discovery_lists_connected_clients_with_details(stack):
    await stack.connected_client("n1", labels=(("site", "lab"),))
    await stack.connected_client("l1", wire_protocol="legacy")
    response = await stack.in_thread(discovery(stack).ListGRPCServer,
                                     discovery_pb2.ListGRPCServerRequest(), timeout=TIMEOUT)
    assert list(response.servers) == ["l1", "n1"]
    details = {d.client_id: d for d in response.details}
    assert details["n1"].wire_protocol == "native"
    assert dict(details["n1"].labels) == {"site": "lab"}
    assert details["l1"].wire_protocol == "legacy"
    assert details["n1"].remote_address.startswith("127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_watch_sees_connect_and_disconnect(stack):
    Connected = discovery_pb2.WatchGRPCServerResponse.EVENT_CONNECTED
    Disconnected = discovery_pb2.WatchGRPCServerResponse.EVENT_DISCONNECTED
    await stack.connected_client("early")
    watch = await stack.in_thread(discovery(stack).WatchGRPCServer,
                                  discovery_pb2.WatchGRPCServerRequest(replay=True),
                                  timeout=TIMEOUT)
    first = await stack.in_thread(next, watch)
    assert (first.server, first.event) == ("early", Connected)
    late = await stack.connected_client("late")
    second = await stack.in_thread(next, watch)
    assert (second.server, second.event) == ("late", Connected)
    await late.stopService()
    third = await stack.in_thread(next, watch)
    assert (third.server, third.event) == ("late", Disconnected)
    watch.cancel()


@pytest_twisted.ensureDeferred
async def test_duplicate_id_of_a_live_client_is_refused(stack):
    first = await stack.connected_client("twin")
    second = stack.client("twin")
    problem = await first_report(second)
    assert "CODE_ALREADY_EXISTS" in problem and "'twin' is already connected" in problem
    assert stack.server.connected_clients["twin"].session is not None
    assert first.tunnel.session is not None


@pytest_twisted.ensureDeferred
async def test_duplicate_id_replaces_a_dead_session(reactor, tmp_path):
    stack = Stack(reactor, tmp_path, settings={"duplicate_ping_timeout": 0.2})
    try:
        first = await stack.connected_client("phoenix")
        dead = stack.server.connected_clients["phoenix"]
        # Frozen: reads nothing, answers no ping.
        first.tunnel.session.transport.pauseProducing()
        first.tunnel.session.transport.stopReading()
        second = await stack.connected_client("phoenix")
        assert stack.server.connected_clients["phoenix"] is not dead
        result = await stack.invoke("Unary", b"new", route("phoenix"), wait_for_ready=True)
        assert result.responses == [b"new"], result.details
        assert second.tunnel.session is not None
    finally:
        await stack.stop()


@pytest.mark.parametrize("bad_id, why", [("two words", "whitespace"), ("a/b", "'/'")])
@pytest_twisted.ensureDeferred
async def test_invalid_id_is_refused_with_a_reason(stack, bad_id, why):
    client = stack.client("placeholder", foreign_id=bad_id)
    problem = await first_report(client)
    assert "CODE_BAD_CLIENT_ID" in problem and why in problem
    assert stack.registry.snapshot == {}


class Conversation:
    """A bidi call driven one message at a time from a thread."""

    END = object()

    def __init__(self, channel, metadata):
        self._requests = queue.Queue()
        stream = channel.stream_stream("/test.Echo/Bidi")
        self.call = stream(iter(self._requests.get, self.END), metadata=metadata,
                           timeout=TIMEOUT)

    def say(self, message):
        self._requests.put(message)
        return next(self.call)

    def finish(self):
        self._requests.put(self.END)
        rest = list(self.call)
        return rest, self.call.code()


@pytest_twisted.ensureDeferred
async def test_graceful_stop_lets_calls_in_flight_finish(stack):
    from grpcmux.server_service import ServerService

    await stack.connected_client("lab")
    talk = await stack.in_thread(Conversation, stack.channel, route("lab"))
    assert await stack.in_thread(talk.say, b"before") == b"before"
    both = ServerService(stack.server, stack.proxy)
    both.running = True
    stopping = both.stopService()
    assert stack.server.port is None  # no longer accepting clients
    assert await stack.in_thread(talk.say, b"during") == b"during"
    assert await stack.in_thread(talk.finish) == ([], OK)
    await stopping.addTimeout(TIMEOUT, stack.reactor)
    assert stack.registry.snapshot == {}


@pytest_twisted.ensureDeferred
async def test_client_leaves_after_go_away_once_its_calls_are_done(stack):
    client = await stack.connected_client("lab")
    session = client.tunnel.session
    talk = await stack.in_thread(Conversation, stack.channel, route("lab"))
    assert await stack.in_thread(talk.say, b"before") == b"before"
    await stack.server.stop_accepting()
    await session.when_go_away().addTimeout(TIMEOUT, stack.reactor)
    assert not session.closed  # a call is still in flight
    assert await stack.in_thread(talk.say, b"during") == b"during"
    assert await stack.in_thread(talk.finish) == ([], OK)
    stack.channel.close()  # the proxy's connection to the client is its last stream
    await stack.proxy.stopService().addTimeout(TIMEOUT, stack.reactor)
    await session.when_closed().addTimeout(TIMEOUT, stack.reactor)
    assert client.tunnel.session is None


@pytest.mark.parametrize("wire_protocol", ["native", "legacy"])
@pytest_twisted.ensureDeferred
async def test_client_stop_drains_its_calls(stack, wire_protocol):
    client = await stack.connected_client("lab", wire_protocol=wire_protocol)
    session = client.tunnel.session
    talk = await stack.in_thread(Conversation, stack.channel, route("lab"))
    assert await stack.in_thread(talk.say, b"before") == b"before"
    left = stack.registry_event("lab")
    stopping = client.stopService()
    assert not stopping.called and not session.closed
    event = await left
    assert (event.kind, event.graceful) == ("disconnected", True)  # no new calls
    assert await stack.in_thread(talk.say, b"during") == b"during"
    assert await stack.in_thread(talk.finish) == ([], OK)
    # The proxy then closes its idle connection to the client, the last stream.
    await stopping.addTimeout(TIMEOUT, stack.reactor)
    assert session.closed


@pytest_twisted.ensureDeferred
async def test_client_stop_cuts_calls_after_the_grace_period(stack):
    from rpc_backend import start_call

    client = await stack.connected_client("lab")
    client.shutdown_grace = 0.2
    pending = await stack.in_thread(start_call, stack.channel, "ServerStream", b"w",
                                    route("lab") + (("x-wait", "1"),), TIMEOUT)
    await stack.in_thread(stack.backend.next_call)
    await client.stopService().addTimeout(TIMEOUT, stack.reactor)
    result = await stack.in_thread(pending.finish)
    assert result.code == grpc.StatusCode.UNAVAILABLE


def _tuned(transport):
    """Nagle off, and bulk reads and sends (a reactor turn per 64 KiB was slower)."""
    no_delay = transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    return no_delay and transport.bufferSize == transport.SEND_LIMIT == IO_SIZE


@pytest_twisted.ensureDeferred
async def test_tcp_legs_are_tuned(stack):
    """Nagle is off on every TCP leg (with it on, a small write waits for the peer's
    delayed ACK: tens of milliseconds per unary call), and each reads and sends in bulk."""
    service = await stack.connected_client("lab", backend_address=stack.backend.tcp_address)
    result = await stack.invoke("Unary", b"ping", route("lab"))
    assert result.code == OK
    [connection] = stack.server.connections
    assert _tuned(connection.session.transport)
    callers = [caller.transport for caller in stack.proxy.router.callers]
    assert callers and all(_tuned(t) for t in callers)
    session = service.tunnel.session
    assert _tuned(session.transport)
    # The router keeps its upstream connection, hence its stream and backend leg, open.
    backend_legs = [s.protocol.peer.transport for s in session.streams.values()
                    if getattr(s.protocol, "peer", None) is not None]
    assert backend_legs and all(_tuned(t) for t in backend_legs)
