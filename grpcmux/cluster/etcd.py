"""etcd's v3 gRPC API, for the reactor: each call returns a Deferred.

The stubs are generated from etcd 3.4's own .proto files (``grpcmux._proto.etcd``).
All grpc objects live on one asyncio loop in a thread of its own (the
``grpc.aio`` model of :mod:`grpcmux.rpc.service`); the reactor hands coroutines
over with ``run_coroutine_threadsafe`` and gets results back with
``callFromThread``, so no etcd call ever blocks the reactor.

Several endpoints are one client: a call that fails with UNAVAILABLE or a
deadline moves the client on to the next endpoint, so the next call (or the
resumed watch) goes to another member.
"""

import asyncio
import threading
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import urlsplit

import grpc
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from grpcmux._proto.etcd.etcdserver.etcdserverpb import rpc_pb2 as pb
from grpcmux._proto.etcd.etcdserver.etcdserverpb import rpc_pb2_grpc as rpc
from grpcmux._proto.etcd.mvcc.mvccpb import kv_pb2

PUT = "put"
DELETE = "delete"
# Seconds one unary call may take before it fails (and the next endpoint is tried).
CALL_TIMEOUT = 3.0
# Unary calls in flight at once on one client; more wait their turn.
MAX_IN_FLIGHT = 64
# A member cut off from its leader ends our streams instead of serving stale data.
_REQUIRE_LEADER = (("hasleader", "true"),)
_ROTATE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_AUTH_RETRY = ("invalid auth token", "user name is empty")


class StoreUnavailable(Exception):
    """etcd could not be reached or refused the call; the message says which and why."""


class Compacted(StoreUnavailable):
    """The revision asked for was compacted away; read the prefix again."""

    def __init__(self, revision):
        super().__init__(f"revision {revision} is compacted")
        self.revision = revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Event:
    kind: str  # PUT or DELETE
    kv: KeyValue  # for DELETE: the key and its mod_revision (the deletion's)


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: ``revision`` is the store's revision when it was sent
    (every change up to it has been delivered, events included)."""

    revision: int
    events: Tuple[Event, ...] = ()
    created: bool = False
    compact_revision: int = 0  # > 0: canceled, history before it is gone


@dataclass(frozen=True)
class Created:
    """The outcome of a create-if-absent transaction."""

    created: bool
    revision: int  # the store's revision after the transaction
    holder: Optional[KeyValue] = None  # the key as it is, when not created


def parse_endpoints(text):
    """``http(s)://host:port[,...]`` -> ([host:port, ...], uses TLS); ValueError if bad."""
    targets, schemes = [], set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = urlsplit(part if "://" in part else "http://" + part)
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ValueError(f"{part!r} is not an etcd URL such as http://127.0.0.1:2379")
        try:
            port = url.port or 2379
        except ValueError:
            raise ValueError(f"{part!r} has a bad port") from None
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        targets.append(f"{host}:{port}")
        schemes.add(url.scheme)
    if not targets:
        raise ValueError("no etcd URL given")
    if len(schemes) > 1:
        raise ValueError("etcd URLs mix http:// and https://")
    return targets, schemes == {"https"}


def _kv(message):
    return KeyValue(message.key.decode("utf-8", "replace"), bytes(message.value),
                    message.create_revision, message.mod_revision, message.lease)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdClient:
    """The etcd calls grpcmux needs, on a loop thread; start() before use, stop() after.

    ``tls``: None (plaintext) or (CA, key, certificate chain) as PEM bytes, each
    None when not given (system trust store, no client certificate);
    ``user``/``password``: etcd authentication, or None.
    """

    _log = Logger()

    def __init__(self, reactor, targets, tls=None, user=None, password=None,
                 call_timeout=CALL_TIMEOUT):
        self._reactor = reactor
        self.targets = list(targets)
        self._tls = tls
        self._credentials = None
        self._user = user
        self._password = password
        self.call_timeout = call_timeout
        self._loop = None
        self._thread = None
        # Loop-thread state:
        self._index = 0
        self._channel = None
        self._token = None
        self._keepalive = None  # the open LeaseKeepAlive stream (a grpc.aio call)
        self._keepalive_lock = None
        self._streams = set()  # watch tasks
        # Batched crossings (see to_loop), under one lock.
        self._lock = threading.Lock()
        self._outbox, self._outbox_waking = [], False
        self._inbox, self._inbox_waking = [], False
        self._stopping = False

    @property
    def target(self):
        return self.targets[self._index]

    def start(self):
        """Start the loop thread (after twistd forked: grpc objects are made now)."""
        if self._tls is not None:
            ca, key, chain = self._tls
            self._credentials = grpc.ssl_channel_credentials(ca, key, chain)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpcmux-etcd", daemon=True)
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._keepalive_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        # Not closed when stopped: grpc's completion poller may still hand it a
        # callback, which a closed loop would refuse with an error.
        self._loop.run_forever()

    def stop(self):
        """End the streams, close the channel, end the loop thread; a Deferred."""
        async def close():
            self._drop_keepalive()
            tasks = [t for t in self._streams if not t.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._channel is not None:
                await self._channel.close(None)
                self._channel = None

        def ended(result):
            self._loop.call_soon_threadsafe(self._loop.stop)
            return result

        d = self._deferred(close())
        self._stopping = True
        return d.addBoth(ended)

    # -- reactor-facing calls ------------------------------------------------------

    def grant(self, ttl):
        """A new lease of ``ttl`` seconds; its id."""
        return self._deferred(self._grant(ttl))

    def keep_alive(self, lease):
        """Refresh ``lease``; its remaining TTL in seconds (0: the lease is gone)."""
        return self._deferred(self._keep_alive(lease))

    def revoke(self, lease):
        return self._deferred(self._unary(
            "Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease)))

    def time_to_live(self, lease):
        """The lease's remaining seconds; -1 if it expired or never existed."""
        d = self._deferred(self._unary(
            "Lease", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease)))
        return d.addCallback(lambda response: response.TTL)

    def create(self, key, value, lease):
        """Put ``key`` only if absent (a transaction on its create revision)."""
        request = pb.TxnRequest(
            compare=[pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE,
                                key=key.encode(), create_revision=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(
                key=key.encode(), value=value, lease=lease))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key.encode()))],
        )

        def outcome(response):
            holder = None
            if not response.succeeded:
                kvs = response.responses[0].response_range.kvs
                holder = _kv(kvs[0]) if kvs else None
            return Created(response.succeeded, response.header.revision, holder)

        return self._deferred(self._unary("KV", "Txn", request)).addCallback(outcome)

    def replace(self, key, value, lease, mod_revision):
        """Put ``key`` only if it was last changed at ``mod_revision``; the new
        mod revision, or None if the key changed (or went) meanwhile."""
        request = pb.TxnRequest(
            compare=[pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD,
                                key=key.encode(), mod_revision=mod_revision)],
            success=[pb.RequestOp(request_put=pb.PutRequest(
                key=key.encode(), value=value, lease=lease))],
        )
        d = self._deferred(self._unary("KV", "Txn", request))
        return d.addCallback(lambda r: r.header.revision if r.succeeded else None)

    def delete(self, key, mod_revision):
        """Delete ``key`` only if it was last changed at ``mod_revision``; True if deleted."""
        request = pb.TxnRequest(
            compare=[pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD,
                                key=key.encode(), mod_revision=mod_revision)],
            success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(
                key=key.encode()))],
        )
        return self._deferred(self._unary("KV", "Txn", request)).addCallback(
            lambda r: r.succeeded)

    def read_prefix(self, prefix, revision=0):
        """(revision, [KeyValue]) of every key under ``prefix`` at ``revision``
        (0: the latest); fails with Compacted if that revision is gone."""
        raw = prefix.encode()
        request = pb.RangeRequest(key=raw, range_end=prefix_end(raw), revision=revision)

        def outcome(response):
            return response.header.revision, [_kv(kv) for kv in response.kvs]

        return self._deferred(self._unary("KV", "Range", request)).addCallback(outcome)

    def watch(self, prefix, start_revision, on_batch, on_end):
        """Watch every key under ``prefix`` from ``start_revision``, with progress
        notifications. ``on_batch(WatchBatch)`` and, once, ``on_end(failure or None)``
        run on the reactor. Returns a handle: ``progress()`` asks etcd for a progress
        notification now, ``cancel()`` ends the watch (on_end is not called then)."""
        handle = _WatchHandle(self, prefix, start_revision, on_batch, on_end)
        if self._stopping:
            handle.cancel()
        else:
            self.to_loop(handle.begin)
        return handle

    # -- loop thread -----------------------------------------------------------------

    def _deferred(self, coroutine):
        """Run ``coroutine`` on the loop; a Deferred of its outcome, on the reactor."""
        if self._stopping:
            coroutine.close()
            return fail(StoreUnavailable("the etcd client is stopped"))
        d = Deferred()
        self.to_loop(self._start_call, coroutine, d)
        return d

    # Work crosses threads in batches: one wake-up of the other side per batch, not
    # per call, as each wake-up hands the GIL over, which with thousands of calls in
    # flight costs more than the calls.

    @property
    def stopping(self):
        """True once ``stop`` was called: nothing more is sent to the loop."""
        return self._stopping

    def to_loop(self, fn, *args):  # reactor
        """Run ``fn(*args)`` on the loop thread (in a batch with others)."""
        with self._lock:
            self._outbox.append((fn, args))
            wake, self._outbox_waking = not self._outbox_waking, True
        if wake:
            self._loop.call_soon_threadsafe(self._run_outbox)

    def _run_outbox(self):  # loop
        with self._lock:
            batch, self._outbox, self._outbox_waking = self._outbox, [], False
        self._run_batch(batch)

    def to_reactor(self, fn, *args):  # loop
        """Run ``fn(*args)`` on the reactor (in a batch with others)."""
        with self._lock:
            self._inbox.append((fn, args))
            wake, self._inbox_waking = not self._inbox_waking, True
        if wake:
            self._reactor.callFromThread(self._run_inbox)

    def _run_inbox(self):  # reactor
        with self._lock:
            batch, self._inbox, self._inbox_waking = self._inbox, [], False
        self._run_batch(batch)

    def _run_batch(self, batch):
        for fn, args in batch:
            try:
                fn(*args)
            except Exception:
                self._log.failure("etcd client: {fn!r} failed", fn=fn)

    def track_stream(self, task):  # loop
        """Keep ``task`` (a watch stream) until it is done, for ``stop`` to cancel."""
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    def _start_call(self, coroutine, d):  # loop
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(lambda t: self.to_reactor(_fire, d, t))

    def channel(self):
        if self._channel is None:
            target = self.target
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(target)
            else:
                self._channel = grpc.aio.secure_channel(target, self._credentials)
        return self._channel

    def failed(self, error, channel=None):
        """A StoreUnavailable for ``error`` of a call on ``channel``; if another
        member might do better, later calls go to the next endpoint."""
        if isinstance(error, StoreUnavailable):
            return error
        target = self.target
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            details = error.details() or code.name
            if "required revision has been compacted" in details:
                return Compacted(0)
            if code in _ROTATE:
                self._next_endpoint(channel)
            return StoreUnavailable(f"etcd {target}: {code.name}: {details}")
        return StoreUnavailable(f"etcd {target}: {error!r}")

    def _next_endpoint(self, failed_channel=None):
        """Move on, once per failing channel (its other calls fail alike); the old
        channel is closed once the calls still on it have had their time."""
        channel = self._channel
        if channel is None or (failed_channel is not None and failed_channel is not channel):
            return
        self._channel = None
        self._token = None
        self._drop_keepalive()
        self._index = (self._index + 1) % len(self.targets)
        self._loop.call_later(self.call_timeout * 2,
                              lambda: asyncio.ensure_future(channel.close(None)))

    async def metadata(self, extra=()):
        if self._user is None:
            return tuple(extra) or None
        if self._token is None:
            stub = rpc.AuthStub(self.channel())
            response = await stub.Authenticate(
                pb.AuthenticateRequest(name=self._user, password=self._password),
                timeout=self.call_timeout)
            self._token = response.token
        return (("token", self._token), *extra)

    async def _unary(self, service, method, request):
        # At most MAX_IN_FLIGHT calls at once: the rest wait here, not against their
        # deadline in grpc's queue (10,000 claims at once timed out and retried).
        async with self._slots:
            for attempt in (1, 2):
                channel = self.channel()
                try:
                    stub = getattr(rpc, f"{service}Stub")(channel)
                    return await getattr(stub, method)(
                        request, timeout=self.call_timeout, metadata=await self.metadata())
                except grpc.aio.AioRpcError as error:
                    if attempt == 1 and any(s in (error.details() or "") for s in _AUTH_RETRY):
                        self._token = None  # expired simple token: authenticate again
                        continue
                    raise self.failed(error, channel) from None

    async def _grant(self, ttl):
        response = await self._unary("Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=ttl))
        if response.error:
            raise StoreUnavailable(f"etcd {self.target}: lease grant: {response.error}")
        return response.ID

    async def _keep_alive(self, lease):
        async with self._keepalive_lock:
            channel = self.channel()
            try:
                if self._keepalive is None:
                    # Written to, not fed by an iterator: a request iterator leaves
                    # grpc a task waiting on it after the stream fails.
                    self._keepalive = rpc.LeaseStub(channel).LeaseKeepAlive(
                        metadata=await self.metadata(_REQUIRE_LEADER))
                call = self._keepalive
                await asyncio.wait_for(call.write(pb.LeaseKeepAliveRequest(ID=lease)),
                                       self.call_timeout)
                response = await asyncio.wait_for(call.read(), self.call_timeout)
                if response is grpc.aio.EOF:
                    raise StoreUnavailable(f"etcd {self.target}: keep-alive stream ended")
                return response.TTL
            except asyncio.TimeoutError:
                self._drop_keepalive()
                self._next_endpoint(channel)
                raise StoreUnavailable(
                    f"etcd {self.target}: no keep-alive answer in {self.call_timeout} s"
                ) from None
            except asyncio.CancelledError:
                self._drop_keepalive()
                raise
            except Exception as error:  # also InvalidStateError: the stream had ended
                self._drop_keepalive()
                raise self.failed(error, channel) from None

    def _drop_keepalive(self):
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None


def _fire(d, task):  # reactor
    if task.cancelled():
        d.errback(StoreUnavailable("the etcd call was cancelled"))
    elif task.exception() is not None:
        d.errback(task.exception())
    else:
        d.callback(task.result())


class _WatchHandle:
    """One watch stream; created on the reactor, run on the loop thread."""

    def __init__(self, client, prefix, start_revision, on_batch, on_end):
        self._client = client
        raw = prefix.encode()
        self._create = pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=raw, range_end=prefix_end(raw), start_revision=start_revision,
            progress_notify=True))
        self._progress = pb.WatchRequest(progress_request=pb.WatchProgressRequest())
        self._on_batch = on_batch
        self._on_end = on_end
        self._call = None
        self._progress_wanted = False
        self._task = None
        self._cancelled = False  # read on both threads; set once

    def begin(self):  # loop thread
        if self._cancelled:
            return
        self._task = asyncio.ensure_future(self._read())
        self._client.track_stream(self._task)

    async def _read(self):
        client = self._client
        channel = client.channel()
        try:
            call = rpc.WatchStub(channel).Watch(
                metadata=await client.metadata(_REQUIRE_LEADER))
            await call.write(self._create)
            self._call = call
            if self._progress_wanted:
                self._write_progress()
            async for response in call:
                if response.canceled:
                    if response.compact_revision:
                        raise Compacted(response.compact_revision)
                    raise StoreUnavailable(f"etcd {client.target}: watch canceled: "
                                           f"{response.cancel_reason or 'no reason given'}")
                batch = WatchBatch(
                    response.header.revision,
                    tuple(Event(PUT if e.type == kv_pb2.Event.PUT else DELETE, _kv(e.kv))
                          for e in response.events),
                    response.created,
                )
                client.to_reactor(self._deliver, batch)
            raise StoreUnavailable(f"etcd {client.target}: watch stream ended")
        except asyncio.CancelledError:
            return
        except Exception as error:
            client.to_reactor(self._ended, client.failed(error, channel))

    def _deliver(self, batch):  # reactor
        if not self._cancelled:
            self._on_batch(batch)

    def _ended(self, error):  # reactor
        if not self._cancelled:
            self._cancelled = True
            self._on_end(error)

    def progress(self):
        """Ask for a progress notification (etcd answers with the current revision)."""
        self._on_loop(self._request_progress)

    def _request_progress(self):
        if self._call is None:
            self._progress_wanted = True  # asked before the stream was open
        else:
            self._write_progress()

    def _write_progress(self):
        self._progress_wanted = False
        write = asyncio.ensure_future(self._call.write(self._progress))
        write.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved

    def cancel(self):
        self._cancelled = True
        self._on_loop(self._stop)

    def _on_loop(self, fn, *args):
        if not self._client.stopping:
            self._client.to_loop(fn, *args)

    def _stop(self):
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
