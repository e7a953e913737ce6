"""Tests for grpcmux.rpc.discovery through a running ProxyService."""

import grpc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
from grpcmux.registry import ClientRegistry
from grpcmux.rpc.discovery import _END, _OVERFLOW, _Feed
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


def logged(events, text):
    return [formatEvent(e) for e in events if text in formatEvent(e)]


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


def test_a_feed_holds_at_most_its_limit_then_ends_in_overflow():
    woken = []
    feed = _Feed(3, lambda: woken.append(True))
    assert feed.take() is None  # empty: the next put wakes the consumer, once
    assert feed.put("a") and feed.put("b") and feed.put("c")
    assert woken == [True] and len(feed) == 3
    assert not feed.put("d")  # one beyond the limit: the waiting ones are dropped
    assert feed.overflowed and len(feed) == 0
    assert feed.take() is _OVERFLOW and feed.get() is _OVERFLOW
    assert not feed.put(_END) and feed.take() is _OVERFLOW


def test_a_feed_ends_after_its_events():
    feed = _Feed(3)
    feed.put("a")
    feed.put(_END)
    assert not feed.put("b")
    assert [feed.get(), feed.get(), feed.take()] == ["a", _END, _END]


async def _until(reactor, predicate, what):
    for _ in range(2000):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"not reached: {what}")


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest_twisted.ensureDeferred
async def test_a_watcher_that_never_reads_is_ended_and_others_keep_watching(
        reactor, tmp_path, engine, log_events):
    limit = 20
    registry = CountingRegistry(reactor)
    mux = Mux(reactor, tmp_path, registry=registry, watch_queue_limit=limit, **ENGINES[engine])
    discovery = mux.service._engine._discovery
    # A connection of its own, whose window does not grow (BDP probing would let
    # grpc's client take in the stalled stream's messages, not the server hold them).
    stalled_channel = grpc.insecure_channel(
        mux.address, options=(("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)))
    try:
        stalled = DiscoveryServiceStub(stalled_channel).WatchGRPCServer(
            pb.WatchGRPCServerRequest(), timeout=60)
        reading = DiscoveryServiceStub(mux.channel).WatchGRPCServer(
            pb.WatchGRPCServerRequest(), timeout=60)
        await registry.when_live(3)  # the service's own observer and two watchers
        seen = []
        reader = mux.in_thread(lambda: seen.extend(r.server for r in reading), timeout=60)
        reader.addErrback(lambda f: f.trap(grpc.RpcError))
        sent = []
        # Connects and disconnects, ten at a time, as fast as the reading watcher
        # takes them; the stalled one's HTTP/2 window fills, then its queue.
        while registry.live == 3:
            assert len(sent) < 5000, "the stalled watcher was never cut off"
            for _ in range(5):
                info = mux.connect(f"client-{len(sent)}-{'x' * 40}")
                mux.registry.remove(info.client_id)
                sent += [info.client_id] * 2
            assert discovery.queued_events() <= limit + 10
            await _until(reactor, lambda: len(seen) == len(sent), "the reader caught up")
        assert registry.live == 2 and discovery.queued_events() == 0
        assert logged(log_events, f"fell more than {limit} events behind; ending it with "
                                  "RESOURCE_EXHAUSTED")
        mux.connect("after")  # the reading watcher goes on
        await _until(reactor, lambda: seen[-1:] == ["after"], "the reader saw 'after'")

        def drain():
            received = []
            try:
                received.extend(r.server for r in stalled)
            except grpc.RpcError as error:
                return received, error.code(), error.details()

        received, code, details = await mux.in_thread(drain)
        assert received == sent[:len(received)] and len(received) < len(sent)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == (f"this Watch fell more than {limit} events behind; watch again "
                           "(with replay) to catch up")
        reading.cancel()
        await reader
        await registry.when_live(1)
    finally:
        stalled_channel.close()
        await mux.stop()
