"""Wire compatibility with the Go grpc-multiplexer v0.2.1, both ways.

The Go programs in ``legacy/`` speak the original's legacy handshake with Debian's
hashicorp/yamux and grpc-go: ``legacyclient`` must be served by our server, and our
client with ``--wire-protocol legacy`` must serve calls made through ``legacyserver``.
"""

import grpc
import pytest
import pytest_twisted
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings
from mux_stack import TIMEOUT
from peers import Peer
from rpc_backend import Backend, in_thread, invoke

OK = grpc.StatusCode.OK
CALLS = [
    ("Unary", b"ping", [b"ping"]),
    ("ServerStream", b"s", [b"s"] * 3),
    ("ClientStream", [b"a", b"b"], [b"a|b"]),
    ("Bidi", [b"x", b"y"], [b"x", b"y"]),
]


@pytest.fixture
def legacy_client_program(go_program):
    return go_program("legacyclient")


@pytest.fixture
def legacy_server_program(go_program):
    return go_program("legacyserver")


@pytest_twisted.ensureDeferred
async def test_go_legacy_client_is_served_by_grpcmux_server(stack, legacy_client_program):
    registered = stack.registered("rainbow")
    client = Peer([legacy_client_program, "--client-id", "rainbow",
                   "--multiplexer-address", stack.multiplexer_address,
                   "--grpc-server-address", stack.backend.tcp_address])
    try:
        assert await stack.in_thread(client.read_line) == "connected"
        await registered
        for kind, request, expected in CALLS:
            result = await stack.invoke(kind, request, (("client-id", "rainbow"), ("x-count", "3")))
            assert (result.code, result.responses) == (OK, expected), result.details
        # The Go client's own gRPC proxy keeps grpc-go's 4 MiB message limit.
        big = bytes(range(256)) * (12 * 1024)
        result = await stack.invoke("Unary", big, (("client-id", "rainbow"),))
        assert result.responses == [big], result.details
        listing = await stack.in_thread(
            discovery_pb2_grpc.DiscoveryServiceStub(stack.channel).ListGRPCServer,
            discovery_pb2.ListGRPCServerRequest(), timeout=TIMEOUT)
        assert list(listing.servers) == ["rainbow"]
        assert listing.details[0].wire_protocol == "legacy"
        gone = Deferred()
        stack.registry.subscribe(lambda event: gone.called or gone.callback(event))
    finally:
        await stack.in_thread(client.stop)
    event = await gone.addTimeout(TIMEOUT, stack.reactor)
    assert event.info.client_id == "rainbow"
    assert stack.registry.snapshot == {}


@pytest_twisted.async_yield_fixture
async def go_server(reactor, legacy_server_program):
    server = Peer([legacy_server_program, "--multiplexer-listener", "127.0.0.1:0",
                   "--proxy-listener", "127.0.0.1:0"])
    server.multiplexer = (await in_thread(reactor, server.read_line)).split()[1]
    server.proxy = (await in_thread(reactor, server.read_line)).split()[1]
    yield server
    await in_thread(reactor, server.stop)


def tunnel_to(reactor, server, backend, wire_protocol, **kwargs):
    settings = ClientSettings(client_id="rainbow",
                              grpc_server_address=f"unix:{backend.socket_path}",
                              multiplexer_address=server.multiplexer,
                              wire_protocol=wire_protocol)
    tunnel = Tunnel(reactor, settings,
                    retry_policy=backoffPolicy(initialDelay=0.05, maxDelay=0.5), **kwargs)
    service = TunnelClientService(reactor, tunnel)
    service.startService()
    return service


@pytest_twisted.ensureDeferred
async def test_grpcmux_legacy_client_is_served_by_go_server(reactor, tmp_path, go_server):
    backend = Backend(str(tmp_path / "backend.sock"))
    service = tunnel_to(reactor, go_server, backend, "legacy")
    channel = grpc.insecure_channel(go_server.proxy)
    try:
        await service.when_connected().addTimeout(TIMEOUT, reactor)
        assert await in_thread(reactor, go_server.read_line) == "registered rainbow"
        for kind, request, expected in CALLS:
            result = await in_thread(reactor, invoke, channel, kind, request,
                                     (("client-id", "rainbow"), ("x-count", "3")), TIMEOUT)
            assert (result.code, result.responses) == (OK, expected), result.details
        seen = backend.next_call()
        assert "client-id" not in dict(seen.metadata)
    finally:
        channel.close()
        await service.stopService()
        await in_thread(reactor, backend.stop)
    assert await in_thread(reactor, go_server.read_line) == "unregistered rainbow"


@pytest_twisted.ensureDeferred
async def test_native_client_against_go_server_suggests_legacy(reactor, tmp_path, go_server):
    backend = Backend(str(tmp_path / "backend.sock"))
    service = tunnel_to(reactor, go_server, backend, "native", handshake_timeout=5.0)
    refused = Deferred()
    service.tunnel.add_problem_observer(lambda problem: refused.called or refused.callback(problem))
    try:
        problem = await refused.addTimeout(TIMEOUT, reactor)
    finally:
        await service.stopService()
        await in_thread(reactor, backend.stop)
    assert "--wire-protocol legacy" in problem
