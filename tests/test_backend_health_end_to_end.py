"""Backend health end to end: a real grpcio gRPC server with the health service behind
a real client, tunnel, server and proxy on loopback; and a fake grpcmux proxy endpoint
as the gRPC server, which the client must refuse."""

import struct
from concurrent import futures

import grpc
import pytest_twisted
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
from grpcmux.addresses import client_endpoint
from grpcmux.backend_health import PROXY_ERROR, BackendHealthChecker
from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings
from grpcmux.http2.frames import (
    PREFACE,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_GRPCMUX_PROXY,
    TYPE_SETTINGS,
    frame_header,
)
from grpcmux.registry import NOT_SERVING, SERVING, UNKNOWN, UPDATED
from mux_stack import TIMEOUT
from rpc_backend import SERVICE, route

DOWN = "client 'edge' reports its gRPC server down"


class HealthBackend:
    """A grpcio server on 127.0.0.1 with grpc.health.v1 and ``/test.Echo/Unary``."""

    def __init__(self, port=0):
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        echo = grpc.method_handlers_generic_handler(
            SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: r)})
        self._server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[echo])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def set(self, status):
        self.health.set("", status)

    def stop(self):
        self._server.stop(None).wait(10)


def health_client(stack, client_id, address, wire_protocol="native"):
    """A client with a backend health checker, as ``grpcmux-client`` builds it."""
    reactor = stack.reactor
    checker = BackendHealthChecker(reactor, client_endpoint(reactor, address), address,
                                   interval=0.3, timeout=TIMEOUT)
    settings = ClientSettings(client_id=client_id, grpc_server_address=address,
                              multiplexer_address=stack.multiplexer_address,
                              wire_protocol=wire_protocol)
    tunnel = Tunnel(reactor, settings,
                    retry_policy=backoffPolicy(initialDelay=0.05, maxDelay=0.5),
                    backend_health=checker)
    service = TunnelClientService(reactor, tunnel)
    checker.setServiceParent(service)
    service.startService()
    stack.clients.append(service)
    return service


def health_is(stack, client_id, health):
    """A Deferred firing once the registry says ``client_id`` reports ``health``."""
    result = Deferred()

    def observe(event=None):
        info = stack.registry.snapshot.get(client_id)
        if info is not None and info.health == health and not result.called:
            unsubscribe()
            result.callback(info)

    unsubscribe = stack.registry.subscribe(observe, updates=True)
    observe()
    return result.addTimeout(TIMEOUT, stack.reactor)


def checker_health(checker, health, reactor):
    """A Deferred firing once the client's checker finds ``health``."""
    result = Deferred()

    def observed(found, detail):
        if found == health and not result.called:
            remove()
            result.callback(None)

    remove = checker.add_health_observer(observed)
    if checker.health == health:
        remove()
        result.callback(None)
    return result.addTimeout(TIMEOUT, reactor)


def listed_health(stack, client_id):
    response = DiscoveryServiceStub(stack.channel).ListGRPCServer(
        pb.ListGRPCServerRequest(), timeout=TIMEOUT)
    return {d.client_id: d.health for d in response.details}[client_id]


async def call(stack):
    return await stack.invoke("Unary", b"ping", metadata=route("edge"))


@pytest_twisted.ensureDeferred
async def test_discovery_and_calls_follow_the_backends_health(stack):
    backend = HealthBackend()
    try:
        await _follow(stack, backend)
    finally:
        await stack.in_thread(lambda: backend.stop())


async def _follow(stack, backend):
    registered = stack.registered("edge")
    health_client(stack, "edge", backend.address)
    await registered
    await health_is(stack, "edge", SERVING)
    assert await stack.in_thread(listed_health, stack, "edge") == pb.GRPCServer.HEALTH_SERVING
    assert (await call(stack)).responses == [b"ping"]

    watch = DiscoveryServiceStub(stack.channel).WatchGRPCServer(
        pb.WatchGRPCServerRequest(replay=True, updates=True), timeout=TIMEOUT * 2)
    try:
        replayed = await stack.in_thread(next, watch)
        assert replayed.event == pb.WatchGRPCServerResponse.EVENT_CONNECTED
        # The gRPC server says NOT_SERVING: the Watch call sees it at once.
        backend.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_is(stack, "edge", NOT_SERVING)
        updated = await stack.in_thread(next, watch)
        assert (updated.event, updated.details.health) == (
            pb.WatchGRPCServerResponse.EVENT_UPDATED, pb.GRPCServer.HEALTH_NOT_SERVING)
    finally:
        watch.cancel()
    assert await stack.in_thread(listed_health, stack, "edge") == pb.GRPCServer.HEALTH_NOT_SERVING
    failed = await call(stack)
    assert (failed.code, failed.details) == (grpc.StatusCode.UNAVAILABLE, DOWN)

    backend.set(health_pb2.HealthCheckResponse.SERVING)
    await health_is(stack, "edge", SERVING)
    assert (await call(stack)).responses == [b"ping"]

    # The gRPC server stops: down; calls fail fast without reaching the tunnel.
    await stack.in_thread(backend.stop)
    await health_is(stack, "edge", NOT_SERVING)
    failed = await call(stack)
    assert (failed.code, failed.details) == (grpc.StatusCode.UNAVAILABLE, DOWN)
    assert await stack.in_thread(listed_health, stack, "edge") == pb.GRPCServer.HEALTH_NOT_SERVING

    # It comes back on the same port: serving again, calls go through.
    restarted = HealthBackend(backend.port)
    backend.stop = restarted.stop
    await health_is(stack, "edge", SERVING)
    assert await stack.in_thread(listed_health, stack, "edge") == pb.GRPCServer.HEALTH_SERVING
    await stack.proxy_channel_ready("edge")
    assert (await call(stack)).responses == [b"ping"]


@pytest_twisted.ensureDeferred
async def test_a_legacy_client_stays_unknown(stack):
    backend = HealthBackend()
    try:
        registered = stack.registered("old")
        service = health_client(stack, "old", backend.address, wire_protocol="legacy")
        await registered
        updates = []
        stack.registry.subscribe(updates.append, updates=True)
        # The client knows; it has no way to say.
        await checker_health(service.tunnel.backend_health, SERVING, stack.reactor)
        assert stack.registry.snapshot["old"].health == UNKNOWN
        assert [e for e in updates if e.kind == UPDATED] == []
        assert await stack.in_thread(listed_health, stack, "old") == pb.GRPCServer.HEALTH_UNKNOWN
    finally:
        await stack.in_thread(backend.stop)


class _FakeProxyEnd(Protocol):
    """Answers as grpcmux's router does: SETTINGS carrying SETTINGS_GRPCMUX_PROXY = 1."""

    def connectionMade(self):
        self.received = bytearray()
        self.factory.connections.append(self)
        waiters, self.factory.waiters = self.factory.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        payload = struct.pack(">HL", SETTINGS_GRPCMUX_PROXY, 1)
        self.transport.write(frame_header(len(payload), TYPE_SETTINGS, 0, 0) + payload)

    def dataReceived(self, data):
        self.received += data


class _StreamEnd(Protocol):
    def __init__(self):
        self.ended = Deferred()
        self.received = b""

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_grpcmux_proxy_as_grpc_server_is_refused_and_nothing_loops(
        stack, reactor, log_events):
    factory = Factory.forProtocol(_FakeProxyEnd)
    factory.connections, factory.waiters = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    try:
        registered = stack.registered("edge")
        health_client(stack, "edge", address)
        await registered
        await health_is(stack, "edge", NOT_SERVING)
        failed = await call(stack)
        assert (failed.code, failed.details) == (grpc.StatusCode.UNAVAILABLE, DOWN)
        # A stream the server opens anyway is refused by the client, not spliced.
        stream_end = _StreamEnd()
        stack.server.connected_clients["edge"].session.open_stream(stream_end)
        await stream_end.ended.addTimeout(TIMEOUT, reactor)
        assert stream_end.received == b""
        for _ in range(2):  # checked again, still a proxy
            factory.waiters.append(Deferred())
            await factory.waiters[-1].addTimeout(TIMEOUT, reactor)
    finally:
        await port.stopListening()
    expected = (PREFACE + frame_header(6, TYPE_SETTINGS, 0, 0)
                + struct.pack(">HL", SETTINGS_ENABLE_PUSH, 0))
    assert {bytes(end.received) for end in factory.connections} <= {expected, b""}
    lines = [e for e in log_events if e.get("log_format") == PROXY_ERROR]
    assert len(lines) == 1 and lines[0]["address"] == address


@pytest_twisted.ensureDeferred
async def test_a_grpc_server_without_health_on_a_unix_socket_serves(stack):
    registered = stack.registered("edge")
    service = health_client(stack, "edge", stack.backend_address)
    await registered
    await health_is(stack, "edge", SERVING)
    assert "no health service" in service.tunnel.backend_health.detail
    assert (await call(stack)).responses == [b"ping"]


@pytest_twisted.ensureDeferred
async def test_the_servers_own_proxy_as_grpc_server_is_refused(stack, log_events):
    proxy = f"127.0.0.1:{stack.proxy.port}"
    registered = stack.registered("edge")
    health_client(stack, "edge", proxy)
    await registered
    await health_is(stack, "edge", NOT_SERVING)
    lines = [e for e in log_events if e.get("log_format") == PROXY_ERROR]
    assert len(lines) == 1 and lines[0]["address"] == proxy
    failed = await call(stack)
    assert (failed.code, failed.details) == (grpc.StatusCode.UNAVAILABLE, DOWN)
