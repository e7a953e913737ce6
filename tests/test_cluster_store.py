"""Unit tests of grpcmux.cluster.store: LeaseKeeper and PrefixWatch on a fake etcd."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from fake_etcd import FakeEtcd, Link
from grpcmux.cluster.etcd import StoreUnavailable, WatchBatch
from grpcmux.cluster.store import Backoff, LeaseKeeper, PrefixWatch


def keeper(clock, etcd, ttl=3):
    lost = []
    lease = etcd.grant(ttl).result
    k = LeaseKeeper(clock, etcd, lease, ttl, lost.append)
    k.start()
    return k, lost


def test_keeps_the_lease_alive():
    clock = Clock()
    etcd = FakeEtcd(clock)
    k, lost = keeper(clock, etcd)
    for _ in range(30):
        clock.advance(0.5)
        etcd.expire()
    assert lost == [] and k.lease in etcd.leases
    k.stop()
    assert clock.getDelayedCalls() == []


def test_lost_when_no_keep_alive_gets_through_within_the_ttl():
    clock = Clock()
    etcd = FakeEtcd(clock)
    k, lost = keeper(clock, etcd)
    clock.advance(1.0)  # one refresh at 1 s: the lease now lives until 4 s
    etcd.set_down(True)
    clock.advance(2.9)
    assert lost == []
    clock.advance(0.2)
    assert lost == ["no keep-alive got through for 3 s"]
    assert clock.getDelayedCalls() == []


def test_lost_when_etcd_says_it_expired():
    clock = Clock()
    etcd = FakeEtcd(clock)
    k, lost = keeper(clock, etcd)
    etcd.revoke_now(k.lease)
    clock.advance(1.0)
    assert lost == ["etcd says the lease expired"]
    assert clock.getDelayedCalls() == []


def test_a_hung_keep_alive_still_expires():
    clock = Clock()
    etcd = FakeEtcd(clock)
    etcd.keep_alive = lambda lease: Deferred()  # never answers
    k, lost = keeper(clock, etcd)
    clock.advance(3.0)
    assert lost == ["no keep-alive got through for 3 s"]


def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff(0.2, 1.0)
    assert [backoff.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.2


def test_watch_delivers_from_the_revision_and_resumes_after_it():
    clock = Clock()
    etcd = FakeEtcd(clock)
    etcd.put("/p/a", b"1")
    start = etcd.revision
    etcd.put("/p/b", b"2")
    seen = []
    link = Link(etcd)
    watch = PrefixWatch(clock, link, "/p/", lambda events: seen.extend(
        (e.kind, e.kv.key) for e in events), lambda: seen.append("compacted"))
    watch.start(start)
    assert seen == [("put", "/p/b")]
    etcd.set_down(True)
    etcd.set_down(False)
    etcd.put("/p/c", b"3")  # while the watch waits to resume
    etcd.put("/other", b"x")
    clock.advance(0.2)
    assert seen == [("put", "/p/b"), ("put", "/p/c")]
    # A progress notification proves the stream alive; it does not move the revision.
    clock.advance(2.0)
    assert link.watches[-1].progress_requests == 1
    assert watch.revision == etcd.revision - 1  # /p/c's; /other is not watched
    # Down again; meanwhile a change, and history compacted past it.
    etcd.set_down(True)
    etcd.put("/p/d", b"4")
    etcd.compact()
    etcd.set_down(False)
    clock.advance(0.2)
    clock.advance(0)
    assert seen == [("put", "/p/b"), ("put", "/p/c"), "compacted"]
    watch.stop()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_a_progress_answer_ahead_of_pending_events_loses_none_of_them():
    """etcd 3.4.23 (Debian's) may answer a progress request of a watcher that is
    catching up with the store's current revision before the events up to it
    (etcd-io/etcd#15220); a watcher that took that revision as reached would miss
    those events for good."""
    clock = Clock()
    etcd = FakeEtcd(clock)
    seen = []
    link = Link(etcd)
    watch = PrefixWatch(clock, link, "/p/", lambda events: seen.extend(
        e.kv.key for e in events), lambda: seen.append("compacted"))
    watch.start(etcd.revision)
    (handle,) = link.watches
    handle.stalled = True  # the next change is not sent yet: the watcher lags
    etcd.put("/p/late", b"1")
    handle.on_batch(WatchBatch(etcd.revision))  # the progress answer, ahead of it
    handle.on_batch(WatchBatch(etcd.revision, (etcd.history[-1],)))  # then the event
    assert seen == ["/p/late"]
    # Resuming after a failure starts after the last event, not the progress answer.
    handle.stalled = False
    etcd.set_down(True)
    etcd.set_down(False)
    etcd.put("/p/next", b"2")
    clock.advance(0.2)
    assert seen == ["/p/late", "/p/next"]
    watch.stop()
