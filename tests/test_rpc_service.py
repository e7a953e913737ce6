"""Tests for grpcmux.rpc.service: lifecycle, and the locally answered services."""

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet.task import deferLater

from grpcmux.config import ServerSettings
from grpcmux.listening import StartupError
from grpcmux.registry import ClientRegistry
from grpcmux.proxy import ProxyService
from rpc_backend import ENGINES, Mux, start_call

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def mux(request, reactor, tmp_path):
    m = Mux(reactor, tmp_path, **ENGINES[request.param])
    m.connect("alpha")
    yield m
    await m.stop()


def test_nothing_grpc_before_start_and_bad_address_fails(reactor):
    service = ProxyService(reactor, ClientRegistry(), ServerSettings(proxy_listener="192.0.2.1:1"))
    assert service.port is None
    with pytest.raises(StartupError, match=r"^--proxy-listener 192\.0\.2\.1:1: cannot listen"):
        service.startService()
    assert not service.running


@pytest_twisted.ensureDeferred
async def test_port_is_bound_after_start(mux):
    assert mux.service.running
    assert mux.service.port > 0
    assert mux.address.endswith(f":{mux.service.port}")


@pytest_twisted.ensureDeferred
async def test_health_is_local_without_routing_key(mux):
    stub = health_pb2_grpc.HealthStub(mux.channel)
    for service in ("", "grpc.multiplexer.v1.DiscoveryService"):
        response = await mux.in_thread(
            stub.Check, health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == SERVING
    assert mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_health_with_client_id_goes_to_the_client(mux):
    stub = health_pb2_grpc.HealthStub(mux.channel)
    with pytest.raises(grpc.RpcError) as caught:
        await mux.in_thread(stub.Check, health_pb2.HealthCheckRequest(),
                            metadata=(("client-id", "alpha"),), timeout=10)
    # The test backend serves no health service: grpc's own answer, from the backend.
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest_twisted.ensureDeferred
async def test_health_routed_by_authority_goes_to_the_client(reactor, tmp_path):
    mux = Mux(reactor, tmp_path, settings={"authority_domain": "mux.test"})
    channel = grpc.insecure_channel(mux.address,
                                    options=[("grpc.default_authority", "alpha.mux.test")])
    try:
        mux.connect("alpha")
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            await mux.in_thread(stub.Check, health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        channel.close()
        await mux.stop()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest_twisted.ensureDeferred
async def test_health_watch_streams_locally(mux):
    stub = health_pb2_grpc.HealthStub(mux.channel)
    responses = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    first = await mux.in_thread(next, responses)
    responses.cancel()
    assert first.status == SERVING


@pytest_twisted.ensureDeferred
async def test_reflection_lists_local_services(mux):
    stub = reflection_pb2_grpc.ServerReflectionStub(mux.channel)

    def ask():
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        return sorted(s.name for s in response.list_services_response.service)

    names = await mux.in_thread(ask)
    assert names == [
        "grpc.health.v1.Health",
        "grpc.multiplexer.v1.DiscoveryService",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


@pytest_twisted.ensureDeferred
async def test_stop_keeps_reactor_free_and_cancels_calls_after_grace(reactor, mux):
    pending = start_call(mux.channel, "Bidi", [b"r"], (("client-id", "alpha"), ("x-wait", "1")))
    record = await mux.in_thread(mux.backend.next_call)
    stopping = mux.service.stopService()
    ticks = []
    # The reactor keeps turning while the grace period runs.
    await deferLater(reactor, 0.1, ticks.append, "tick")
    assert ticks == ["tick"] and not stopping.called
    await stopping.addTimeout(10, reactor)
    result = await mux.in_thread(pending.finish)
    assert result.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert await mux.in_thread(record.settled.wait, 10)
    assert record.outcome == "cancelled"
    assert not mux.service.running


@pytest_twisted.ensureDeferred
async def test_backend_down_then_up_and_when_client_ready(mux):
    from rpc_backend import Backend

    path = str(mux.tmp_path / "late.sock")
    mux.connect("late", path)
    result = await mux.invoke("Unary", b"x", (("client-id", "late"),))
    assert result.code == grpc.StatusCode.UNAVAILABLE
    backend = Backend(path)
    try:
        await mux.service.when_client_ready("late").addTimeout(15, mux.reactor)
        result = await mux.invoke("Unary", b"x", (("client-id", "late"),))
    finally:
        await mux.in_thread(backend.stop)
    assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"x"])


@pytest_twisted.ensureDeferred
async def test_when_client_ready_fails_for_unknown_client(mux):
    from grpcmux.http2.status import CallRefused

    with pytest.raises(CallRefused, match="client 'nobody' is not connected"):
        await mux.service.when_client_ready("nobody").addTimeout(15, mux.reactor)


@pytest_twisted.ensureDeferred
async def test_local_services_stopped_right_after_start_stop_cleanly(reactor, tmp_path):
    """What a proxy whose listener fails does: stop(0) at once. The stop coroutine
    ran after ``stop`` had forgotten the server (AttributeError, logged unhandled)."""
    from grpcmux.rpc.service import LocalServices

    local = LocalServices(reactor, ClientRegistry(), str(tmp_path / "local.sock"), None,
                          ServerSettings().watch_queue_limit)
    local.start()
    await local.stop(0).addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_cluster_health_follows_the_registration(reactor, tmp_path):
    """``grpcmux.cluster`` health says whether the node is registered in etcd."""
    observers = []

    def add_health_observer(observer):
        observers.append(observer)
        observer(False)  # as a cluster registry does: at once, then on every change
        return lambda: observers.remove(observer)

    m = Mux(reactor, tmp_path, cluster_health=add_health_observer)
    stub = health_pb2_grpc.HealthStub(m.channel)
    request = health_pb2.HealthCheckRequest(service="grpcmux.cluster")

    async def status():
        for _ in range(100):  # the health servicer is set on its own thread
            response = await m.in_thread(stub.Check, request, timeout=10)
            if response.status == wanted:
                return response.status
            await deferLater(reactor, 0.05, lambda: None)
        return response.status

    try:
        wanted = health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status() == wanted
        observers[0](True)
        wanted = SERVING
        assert await status() == wanted
    finally:
        await m.stop()
    assert observers == []  # stopping removed the observer
