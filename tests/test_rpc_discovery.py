"""Tests for grpcmux.rpc.discovery through a running ProxyService."""

import grpc
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
from grpcmux.registry import ClientRegistry
from rpc_backend import ENGINES, Mux

CONNECTED = pb.WatchGRPCServerResponse.EVENT_CONNECTED
DISCONNECTED = pb.WatchGRPCServerResponse.EVENT_DISCONNECTED


class CountingRegistry(ClientRegistry):
    """Counts live subscriptions and tells when the count reaches a value."""

    def __init__(self, reactor):
        super().__init__()
        self._reactor = reactor
        self.live = 0
        self._waiting = []

    def subscribe(self, observer):
        unsubscribe = super().subscribe(observer)
        self._count(+1)
        done = []

        def counted_unsubscribe():
            if not done:
                done.append(True)
                self._count(-1)
            unsubscribe()

        return counted_unsubscribe

    def _count(self, delta):
        self.live += delta
        for count, d in list(self._waiting):
            if count == self.live:
                self._waiting.remove((count, d))
                d.callback(count)

    def when_live(self, count, timeout=10.0):
        """A Deferred firing once ``count`` subscriptions are live (now, or later)."""
        if self.live == count:
            return succeed(count)
        d = Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(timeout, self._reactor)


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def mux(request, reactor, tmp_path):
    m = Mux(reactor, tmp_path, **ENGINES[request.param], registry=CountingRegistry(reactor))
    m.stub = DiscoveryServiceStub(m.channel)
    yield m
    await m.stop()


def _events(responses, count):
    """Read ``count`` Watch responses (blocking) as (server, event) pairs."""
    return [(r.server, r.event) for _, r in zip(range(count), responses)]


@pytest_twisted.ensureDeferred
async def test_list_sorted_with_details(mux):
    for client_id in ("zeta", "alpha", "mid"):
        mux.connect(client_id)
    response = await mux.in_thread(mux.stub.ListGRPCServer, pb.ListGRPCServerRequest(),
                                   timeout=10)
    assert list(response.servers) == ["alpha", "mid", "zeta"]
    assert [d.client_id for d in response.details] == ["alpha", "mid", "zeta"]
    info = mux.registry.get("alpha")
    details = response.details[0]
    assert details.remote_address == info.remote_address
    assert details.wire_protocol == "native"
    assert dict(details.labels) == {"zone": "a"}
    assert abs(details.connected_since.ToNanoseconds() / 1e9 - info.connected_at) < 1e-6


@pytest_twisted.ensureDeferred
async def test_discovery_is_local_whatever_the_metadata(mux):
    mux.connect("alpha")
    response = await mux.in_thread(mux.stub.ListGRPCServer, pb.ListGRPCServerRequest(),
                                   metadata=(("client-id", "alpha"),), timeout=10)
    assert list(response.servers) == ["alpha"]
    assert mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_watch_with_replay_then_live_events_in_order(reactor, mux):
    mux.connect("b")
    mux.connect("a")
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(replay=True), timeout=20)
    replayed = await mux.in_thread(_events, responses, 2)
    assert replayed == [("a", CONNECTED), ("b", CONNECTED)]
    mux.connect("c")
    mux.registry.remove("a")
    mux.registry.remove("c")
    live = await mux.in_thread(_events, responses, 3)
    assert live == [("c", CONNECTED), ("a", DISCONNECTED), ("c", DISCONNECTED)]
    responses.cancel()


@pytest_twisted.ensureDeferred
async def test_watch_without_replay_and_details(mux):
    mux.connect("old")
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(), timeout=20)
    await mux.registry.when_live(2)  # the service's own observer + this watcher
    mux.connect("new")
    [first] = await mux.in_thread(lambda: [next(responses)])
    responses.cancel()
    assert (first.server, first.event) == ("new", CONNECTED)
    assert first.details.client_id == "new"
    assert dict(first.details.labels) == {"zone": "a"}


@pytest_twisted.ensureDeferred
async def test_departed_watcher_leaves_nothing_behind(mux):
    baseline = mux.registry.live
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(), timeout=20)
    await mux.registry.when_live(baseline + 1)
    responses.cancel()
    await mux.registry.when_live(baseline)
    mux.connect("after")  # nobody is left to feed


@pytest_twisted.ensureDeferred
async def test_stop_ends_open_watch_streams(mux):
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(), timeout=20)
    await mux.registry.when_live(2)
    await mux.service.stopService().addTimeout(10, mux.reactor)
    leftover = await mux.in_thread(list, responses)
    assert leftover == []
    assert responses.code() == grpc.StatusCode.OK
