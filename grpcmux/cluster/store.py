"""Reactor-side upkeep of the two long-lived things a node has in etcd.

``LeaseKeeper`` keeps a lease alive and says when it is lost: etcd answered TTL 0,
or no keep-alive got through before the last known TTL ran out. ``PrefixWatch``
follows every change under a prefix from a revision, exactly once and in order:
after an error (a member died, lost its leader, the stream stalled) it resumes
from the revision after the last one it delivered, on the next endpoint. The
``revision`` it has delivered up to advances with events and with progress
notifications, which etcd sends for a watcher that is caught up (periodically, and
on request: a request that gets no answer is how a stalled stream is noticed).

Both take the :class:`~grpcmux.cluster.etcd.EtcdClient` calls (or a fake with the
same methods) and a clock; neither blocks.
"""

from twisted.logger import Logger

from grpcmux.cluster.etcd import Compacted, StoreUnavailable

# Delays between attempts after a failure: from the first to the cap.
RETRY_FIRST = 0.2
RETRY_CAP = 5.0


class Backoff:
    """Doubling delays from RETRY_FIRST to RETRY_CAP; ``reset()`` after a success."""

    def __init__(self, first=RETRY_FIRST, cap=RETRY_CAP):
        self._first = first
        self._cap = cap
        self._next = first

    def next(self):
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay

    def reset(self):
        self._next = self._first


class LeaseKeeper:
    """Refreshes ``lease`` every ttl/3 s; ``on_lost(reason)`` once it is gone."""

    _log = Logger()

    def __init__(self, clock, client, lease, ttl, on_lost):
        self._clock = clock
        self._client = client
        self.lease = lease
        self._ttl = ttl
        self._interval = max(ttl / 3.0, 0.1)
        self._on_lost = on_lost
        self._beat_call = None
        self._expiry = None
        self._stopped = False
        self._failing = False

    def start(self):
        self._expire_in(self._ttl)
        self._beat_call = self._clock.callLater(self._interval, self._beat)

    def _expire_in(self, seconds):
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = self._clock.callLater(max(seconds, 0), self._expired)

    def _beat(self):
        self._beat_call = None
        sent = self._clock.seconds()
        self._client.keep_alive(self.lease).addCallbacks(
            self._answered, self._failed, callbackArgs=(sent,))

    def _answered(self, ttl, sent):
        if self._stopped:
            return
        if ttl <= 0:
            self._lose("etcd says the lease expired")
            return
        if self._failing:
            self._log.info("etcd keep-alive of lease {lease:x} works again", lease=self.lease)
            self._failing = False
        # The lease lives ``ttl`` s from when etcd answered, which is after ``sent``.
        self._expire_in(sent + ttl - self._clock.seconds())
        self._beat_call = self._clock.callLater(self._interval, self._beat)

    def _failed(self, failure):
        failure.trap(StoreUnavailable)
        if self._stopped:
            return
        if not self._failing:
            self._log.warn("etcd keep-alive of lease {lease:x} failed: {error}",
                           lease=self.lease, error=failure.value)
            self._failing = True
        self._beat_call = self._clock.callLater(self._interval, self._beat)

    def _expired(self):
        self._expiry = None
        self._lose(f"no keep-alive got through for {self._ttl} s")

    def _lose(self, reason):
        if not self._stopped:
            self.stop()
            self._on_lost(reason)

    def stop(self):
        self._stopped = True
        for call in (self._beat_call, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._beat_call = self._expiry = None


class PrefixWatch:
    """Every change under ``prefix`` after ``start(revision)``, in order, once.

    ``on_events(events)`` gets each batch (one etcd revision is never split);
    ``on_compacted()`` is called when history was compacted past ``revision``:
    the owner reads the prefix again and calls ``start`` with that read's revision.
    Every ``check_interval`` s a progress notification is requested; a stream that
    answered nothing since the previous check is stalled and is replaced.
    """

    _log = Logger()

    def __init__(self, clock, client, prefix, on_events, on_compacted, check_interval=2.0):
        self._clock = clock
        self._client = client
        self._prefix = prefix
        self._on_events = on_events
        self._on_compacted = on_compacted
        self._check_interval = check_interval
        self.revision = 0
        self._handle = None
        self._heard = False
        self._check_call = None
        self._retry_call = None
        self._backoff = Backoff()
        self._failing = False
        self._stopped = True

    def start(self, revision):
        """Deliver every change after ``revision``."""
        self.stop()
        self._stopped = False
        self.revision = revision
        self._open()

    def _open(self):
        self._retry_call = None
        self._heard = True
        self._handle = self._client.watch(
            self._prefix, self.revision + 1, self._batch, self._ended)
        self._check_call = self._clock.callLater(self._check_interval, self._check)

    def _batch(self, batch):
        self._heard = True
        if self._failing:
            self._failing = False
            self._log.info("etcd watch of {prefix} resumed after revision {revision}",
                           prefix=self._prefix, revision=self.revision)
        self._backoff.reset()
        # Only events move the revision on: etcd before 3.4.24 may answer a progress
        # request with a revision ahead of events it has yet to send (etcd-io/etcd
        # #15220), and those events must not be dropped as old.
        events = tuple(e for e in batch.events if e.kv.mod_revision > self.revision)
        if events:
            self.revision = events[-1].kv.mod_revision
            self._on_events(events)

    def _check(self):
        self._check_call = None
        if not self._heard:
            self._restart(StoreUnavailable(
                f"no answer to a progress request in {self._check_interval} s"))
            return
        self._heard = False
        self._handle.progress()
        self._check_call = self._clock.callLater(self._check_interval, self._check)

    def _ended(self, error):
        self._handle = None
        if isinstance(error, Compacted):
            self._log.warn("etcd history of {prefix} is compacted past revision "
                           "{revision}: reading it again", prefix=self._prefix,
                           revision=self.revision)
            self.stop()
            self._on_compacted()
            return
        self._restart(error)

    def _restart(self, error):
        if self._stopped:
            return
        self._close()
        delay = self._backoff.next()
        log = self._log.debug if self._failing else self._log.warn
        log("etcd watch of {prefix} failed ({error}); resuming after revision "
            "{revision} in {delay:g} s", prefix=self._prefix, error=error,
            revision=self.revision, delay=delay)
        self._failing = True
        self._retry_call = self._clock.callLater(delay, self._open)

    def _close(self):
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for call in (self._check_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._check_call = self._retry_call = None

    def stop(self):
        self._stopped = True
        self._close()
