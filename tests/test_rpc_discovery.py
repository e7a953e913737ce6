"""Tests for grpcmux.rpc.discovery through a running ProxyService."""

import grpc
import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
from grpcmux.registry import ClientInfo
from grpcmux.rpc.discovery import END_OF_WATCH, OVERFLOW, EventLog, WatchReader
from rpc_backend import ENGINES, Mux

CONNECTED = pb.WatchGRPCServerResponse.EVENT_CONNECTED
DISCONNECTED = pb.WatchGRPCServerResponse.EVENT_DISCONNECTED


async def until(reactor, predicate, what):
    for _ in range(2000):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"not reached: {what}")


def watching(mux, count):
    """Wait until ``count`` Watch calls have joined the service's event log."""
    discovery = mux.service.local.discovery
    return until(mux.reactor, lambda: discovery.watching() == count, f"{count} watching")


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def mux(request, reactor, tmp_path):
    m = Mux(reactor, tmp_path, **ENGINES[request.param])
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
    await watching(mux, 1)
    mux.connect("new")
    [first] = await mux.in_thread(lambda: [next(responses)])
    responses.cancel()
    assert (first.server, first.event) == ("new", CONNECTED)
    assert first.details.client_id == "new"
    assert dict(first.details.labels) == {"zone": "a"}


@pytest_twisted.ensureDeferred
async def test_departed_watcher_leaves_nothing_behind(mux):
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(), timeout=20)
    await watching(mux, 1)
    responses.cancel()
    await watching(mux, 0)
    mux.connect("after")  # nobody is left to feed


@pytest_twisted.ensureDeferred
async def test_stop_ends_open_watch_streams(mux):
    responses = mux.stub.WatchGRPCServer(pb.WatchGRPCServerRequest(), timeout=20)
    await watching(mux, 1)
    await mux.service.stopService().addTimeout(10, mux.reactor)
    leftover = await mux.in_thread(list, responses)
    assert leftover == []
    assert responses.code() == grpc.StatusCode.OK


class Event:
    kind = "connected"

    def __init__(self, name):
        self.info = name


def names(batch):
    return [info for _, info in batch]


def test_the_event_log_keeps_the_last_limit_events_for_its_readers():
    log = EventLog(3)
    log.append(Event("before"))  # nobody reads: not kept
    woken = []
    slow, quick = WatchReader(lambda: woken.append("slow")), WatchReader(lambda: woken.append("quick"))
    assert log.join(slow) and log.join(quick)
    for name in "abc":
        log.append(Event(name))
    assert names(log.next_batch(quick)) == ["a", "b", "c"]
    assert log.next_batch(quick) is None  # waiting: woken on the next one
    log.append(Event("d"))  # "a" drops out: slow is more than 3 behind
    log.append(Event("e"))
    assert woken == ["quick"]  # once, and only the one waiting
    assert names(log.next_batch(quick)) == ["d", "e"]
    assert log.next_batch(slow) is OVERFLOW
    log.leave(slow)
    assert log.next_batch(slow) is END_OF_WATCH and log.readers == 1 and woken[-1] == "slow"


def test_readers_end_after_what_they_have_not_read_and_late_joiners_not_at_all():
    log = EventLog(3)
    woken = []
    reader, gone = WatchReader(lambda: woken.append(True)), WatchReader(lambda: None)
    log.join(reader)
    log.append(Event("a"))
    log.leave(gone)  # its call ended before it joined
    assert not log.join(gone)
    log.close()
    log.append(Event("after"))
    assert names(log.next_batch(reader)) == ["a"]
    assert log.next_batch(reader) is END_OF_WATCH and woken
    assert not log.join(WatchReader(lambda: None))
    log.leave(reader)
    assert log.readers == 0 and log.kept == 0  # nothing kept for nobody


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest_twisted.ensureDeferred
async def test_a_watcher_that_never_reads_is_ended_and_others_keep_watching(
        reactor, tmp_path, engine, log_events):
    limit = 20
    mux = Mux(reactor, tmp_path, settings={"watch_queue_limit": limit}, **ENGINES[engine])
    discovery = mux.service.local.discovery
    # A connection of its own, whose window does not grow (BDP probing would let
    # grpc's client take in the stalled stream's messages, not the server hold them).
    stalled_channel = grpc.insecure_channel(
        mux.address, options=(("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)))
    try:
        stalled = DiscoveryServiceStub(stalled_channel).WatchGRPCServer(
            pb.WatchGRPCServerRequest(), timeout=60)
        reading = DiscoveryServiceStub(mux.channel).WatchGRPCServer(
            pb.WatchGRPCServerRequest(), timeout=60)
        await watching(mux, 2)
        seen = []
        reader = mux.in_thread(lambda: seen.extend(r.server for r in reading), timeout=60)
        reader.addErrback(lambda f: f.trap(grpc.RpcError))
        sent = []
        # 2,000 connects and disconnects of 4 KiB each, ten at a time, as fast as
        # the reading watcher takes them: the router's and grpc's windows for the
        # stalled one fill (a few MiB), then it falls behind.  The server keeps the
        # last 20 events whatever the watchers do.
        labels = (("padding", "x" * 4096),)
        while len(sent) < 2000:
            for _ in range(5):
                info = ClientInfo(f"client-{len(sent)}", 0.0, "192.0.2.7:4567", "native", labels)
                mux.registry.add(info)
                mux.registry.remove(info.client_id)
                sent += [info.client_id] * 2
            assert discovery.events_kept() <= limit
            await until(reactor, lambda: len(seen) == len(sent), "the reader caught up")
        mux.connect("after")  # the reading watcher goes on
        await until(reactor, lambda: seen[-1:] == ["after"], "the reader saw 'after'")
        assert discovery.watching() == 2  # the stalled one has not read since

        def drain():
            received = []
            try:
                received.extend(r.server for r in stalled)
            except grpc.RpcError as error:
                return received, error.code(), error.details()

        received, code, details = await mux.in_thread(drain, timeout=60)
        assert received == sent[:len(received)] and len(received) < len(sent)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == (f"this Watch fell more than {limit} events behind; watch again "
                           "(with replay) to catch up")
        await until(reactor, lambda: logged(
            log_events, f"fell more than {limit} events behind; ending it with "
                        "RESOURCE_EXHAUSTED"), "the stalled watcher logged")
        await watching(mux, 1)
        reading.cancel()
        await reader
        await watching(mux, 0)
        assert discovery.events_kept() == 0  # nothing kept once nobody watches
    finally:
        stalled_channel.close()
        await mux.stop()
