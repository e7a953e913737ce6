"""An in-memory stand-in for grpcmux.cluster.etcd.EtcdClient, for unit tests only.

Same methods and results; revisions, leases (expiring on a ``task.Clock``),
create/replace/delete transactions and prefix watches behave like etcd's. Calls
answer at once (fired Deferreds); ``down = True`` makes every call fail and ends
every watch, like an unreachable etcd; ``compact()`` drops history.
"""

from twisted.internet.defer import Deferred, fail, succeed

from grpcmux.cluster.etcd import (DELETE, PUT, Compacted, Created, Event, KeyValue,
                                  StoreUnavailable, WatchBatch)


class FakeWatch:
    def __init__(self, etcd, prefix, on_batch, on_end):
        self.etcd = etcd
        self.prefix = prefix
        self.on_batch = on_batch
        self.on_end = on_end
        self.cancelled = False
        self.stalled = False  # answers nothing (a hung stream)
        self.progress_requests = 0

    def progress(self):
        self.progress_requests += 1
        if not self.stalled and not self.etcd.down:
            self.on_batch(WatchBatch(self.etcd.revision))

    def cancel(self):
        self.cancelled = True
        self.etcd.watches.discard(self)


class FakeEtcd:
    targets = ["fake:2379"]

    def __init__(self, clock):
        self.clock = clock
        self.revision = 1
        self.compacted = 0
        self.data = {}  # key -> KeyValue
        self.history = []  # Events, in order
        self.leases = {}  # id -> expiry time
        self._next_lease = 0x100
        self.watches = set()
        self.down = False
        self.started = self.stopped = False

    # lifecycle
    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        return succeed(None)

    # helpers
    def _check(self):
        if self.down:
            return fail(StoreUnavailable("etcd fake:2379: UNAVAILABLE: down"))
        self.expire()
        return None

    def expire(self):
        now = self.clock.seconds()
        for lease, expiry in list(self.leases.items()):
            if expiry <= now:
                self.revoke_now(lease)

    def revoke_now(self, lease):
        self.leases.pop(lease, None)
        for key, kv in list(self.data.items()):
            if kv.lease == lease:
                self._delete(key)

    def set_down(self, down):
        self.down = down
        if down:
            for watch in list(self.watches):
                watch.cancel()
                watch.on_end(StoreUnavailable("etcd fake:2379: UNAVAILABLE: down"))

    def _emit(self, event):
        self.history.append(event)
        for watch in list(self.watches):
            if event.kv.key.startswith(watch.prefix) and not watch.stalled:
                watch.on_batch(WatchBatch(self.revision, (event,)))

    def _put(self, key, value, lease):
        if lease and lease not in self.leases:
            return None
        self.revision += 1
        old = self.data.get(key)
        kv = KeyValue(key, value, old.create_revision if old else self.revision,
                      self.revision, lease)
        self.data[key] = kv
        self._emit(Event(PUT, kv))
        return kv

    def _delete(self, key):
        old = self.data.pop(key)
        self.revision += 1
        self._emit(Event(DELETE, KeyValue(key, b"", 0, self.revision, 0)))
        return old

    def put(self, key, value, lease=0):
        """Write as another party would (test setup)."""
        return self._put(key, value, lease)

    # the client's methods
    def grant(self, ttl):
        return self._check() or self._grant(ttl)

    def _grant(self, ttl):
        self._next_lease += 1
        self.leases[self._next_lease] = self.clock.seconds() + ttl
        self.ttls = getattr(self, "ttls", {})
        self.ttls[self._next_lease] = ttl
        return succeed(self._next_lease)

    def keep_alive(self, lease):
        problem = self._check()
        if problem:
            return problem
        if lease not in self.leases:
            return succeed(0)
        self.leases[lease] = self.clock.seconds() + self.ttls[lease]
        return succeed(self.ttls[lease])

    def revoke(self, lease):
        problem = self._check()
        if problem:
            return problem
        self.revoke_now(lease)
        return succeed(None)

    def time_to_live(self, lease):
        problem = self._check()
        if problem:
            return problem
        if lease not in self.leases:
            return succeed(-1)
        return succeed(int(self.leases[lease] - self.clock.seconds()))

    def _lease_missing(self):
        return fail(StoreUnavailable("etcd fake: NOT_FOUND: etcdserver: requested lease not found"))

    def create(self, key, value, lease):
        problem = self._check()
        if problem:
            return problem
        if key in self.data:
            return succeed(Created(False, self.revision, self.data[key]))
        if self._put(key, value, lease) is None:
            return self._lease_missing()
        return succeed(Created(True, self.revision))

    def replace(self, key, value, lease, mod_revision):
        problem = self._check()
        if problem:
            return problem
        current = self.data.get(key)
        if (current.mod_revision if current else 0) != mod_revision:
            return succeed(None)
        kv = self._put(key, value, lease)
        if kv is None:
            return self._lease_missing()
        return succeed(kv.mod_revision)

    def delete(self, key, mod_revision):
        problem = self._check()
        if problem:
            return problem
        current = self.data.get(key)
        if current is None or current.mod_revision != mod_revision:
            return succeed(False)
        self._delete(key)
        return succeed(True)

    def read_prefix(self, prefix, revision=0):
        problem = self._check()
        if problem:
            return problem
        kvs = [kv for key, kv in sorted(self.data.items()) if key.startswith(prefix)]
        return succeed((self.revision, kvs))

    def watch(self, prefix, start_revision, on_batch, on_end):
        watch = FakeWatch(self, prefix, on_batch, on_end)
        if self.down:
            self.clock.callLater(0, on_end, StoreUnavailable("etcd fake: UNAVAILABLE: down"))
            return watch
        if start_revision <= self.compacted:
            self.clock.callLater(0, on_end, Compacted(self.compacted))
            return watch
        self.watches.add(watch)
        on_batch(WatchBatch(self.revision, created=True))
        for event in self.history:
            if event.kv.mod_revision >= start_revision and event.kv.key.startswith(prefix):
                on_batch(WatchBatch(self.revision, (event,)))
        return watch

    def compact(self):
        self.compacted = self.revision
        self.history.clear()


class _DeadWatch:
    """The watch handle of a link that answers nothing."""

    def progress(self):
        pass

    def cancel(self):
        pass


class Link:
    """One node's way to a FakeEtcd: the fake itself until cut or silenced.

    ``cut`` (a set of method names) makes those calls fail as an unreachable etcd
    would, for this node only; ``silence()`` is the node's process dying: nothing
    it asks is answered any more and its watches deliver nothing.  ``watches``
    holds the watch handles this node opened.
    """

    def __init__(self, etcd):
        self.etcd = etcd
        self.cut = set()
        self.silent = False
        self.watches = []

    def silence(self):
        self.silent = True

    def watch(self, prefix, start_revision, on_batch, on_end):
        if self.silent:
            return _DeadWatch()
        handle = self.etcd.watch(prefix, start_revision, self._unless_silent(on_batch),
                                 self._unless_silent(on_end))
        self.watches.append(handle)
        return handle

    def _unless_silent(self, fn):
        def call(*args):
            if not self.silent:
                fn(*args)

        return call

    def __getattr__(self, name):
        real = getattr(self.etcd, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            if self.silent:
                return Deferred()
            if name in self.cut:
                return fail(StoreUnavailable("cut off"))
            return real(*args, **kwargs)

        return call
