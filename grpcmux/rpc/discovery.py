"""The Discovery API (grpc.multiplexer.v1.DiscoveryService) on the client registry.

List reads the registry's immutable snapshot.  Watch reads a shared log of the
registry's last ``limit`` changes (``--watch-queue-limit``), which the reactor
appends to: each caller keeps only its place in it, so callers cost no memory per
event however many there are and however slow they read.  A caller joins the log
on the reactor thread in the same turn as it takes the replay snapshot, so no
event is lost or seen twice; it leaves when its call ends, even if that happens
before it joined.  One whose next event has dropped out of the log fell more than
``limit`` events behind: its stream ends with RESOURCE_EXHAUSTED, and it can watch
again with replay to catch up.

With proxy tokens configured, List and Watch require a known token in the
``grpcmux-token`` metadata (else UNAUTHENTICATED) and show only the ids that token
may call: the listing is the map of what can be reached, so it is no more public
than the clients themselves.
"""

import asyncio
import threading

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import (
    CONNECTED,
    DISCONNECTED,
    NOT_SERVING,
    SERVING,
    UNKNOWN,
    UPDATED,
    ClientInfo,
)
from grpcmux.rpc.security import UNAUTHENTICATED_DETAILS
from grpcmux.rpc.threads import ReactorUnavailable, await_in_reactor
from grpcmux.tokens import ProxyTokens

_EVENTS = {
    CONNECTED: discovery_pb2.WatchGRPCServerResponse.EVENT_CONNECTED,
    DISCONNECTED: discovery_pb2.WatchGRPCServerResponse.EVENT_DISCONNECTED,
    UPDATED: discovery_pb2.WatchGRPCServerResponse.EVENT_UPDATED,
}
_HEALTH = {
    UNKNOWN: discovery_pb2.GRPCServer.HEALTH_UNKNOWN,
    SERVING: discovery_pb2.GRPCServer.HEALTH_SERVING,
    NOT_SERVING: discovery_pb2.GRPCServer.HEALTH_NOT_SERVING,
}
# Ends a watcher's stream: its call ended, or the server stops.
END_OF_WATCH = object()
# Ends a watcher's stream in place of its events when it fell too far behind.
OVERFLOW = object()
# How long a new watcher waits for the reactor to let it join the event log.
SUBSCRIBE_TIMEOUT = 5.0


def server_details(info: ClientInfo) -> discovery_pb2.GRPCServer:
    """The Discovery message describing one registry entry."""
    since = Timestamp()
    since.FromNanoseconds(int(info.connected_at * 1e9))
    return discovery_pb2.GRPCServer(
        client_id=info.client_id,
        connected_since=since,
        remote_address=info.remote_address,
        wire_protocol=info.wire_protocol,
        labels=dict(info.labels),
        health=_HEALTH[info.health],
    )


def _everyone(client_id):
    return True


def visible_ids(tokens, metadata):
    """A predicate on the ids a caller may see: all without ``tokens``; those its
    token may call with them; None when the caller has no known token."""
    if tokens is None:
        return _everyone
    patterns = tokens.patterns_in(metadata)
    if patterns is None:
        return None
    return lambda client_id: ProxyTokens.allows(patterns, client_id)


def list_response(snapshot, visible=_everyone) -> discovery_pb2.ListGRPCServerResponse:
    ids = sorted(i for i in snapshot if visible(i))
    return discovery_pb2.ListGRPCServerResponse(
        servers=ids, details=[server_details(snapshot[i]) for i in ids]
    )


def _watch_response(kind, info):
    return discovery_pb2.WatchGRPCServerResponse(
        server=info.client_id, event=_EVENTS[kind], details=server_details(info)
    )


def _overflow_details(limit):
    return (f"this Watch fell more than {limit} events behind; watch again "
            "(with replay) to catch up")


class WatchReader:
    """One Watch caller's place in the event log; ``wake()`` (any thread) tells it,
    when it waits, that something happened."""

    __slots__ = ("position", "end_at", "wake", "updates")

    def __init__(self, wake, updates=False):
        self.position = None  # the sequence number of its next event
        self.end_at = None  # ending: its events before this one, then END_OF_WATCH
        self.wake = wake
        self.updates = updates  # it asked for UPDATED events (health changes)


class EventLog:
    """The registry's last ``limit`` changes, shared by every Watch caller.

    The reactor appends; callers read on from their own positions on the asyncio
    loop, under a lock.  Events are kept only while someone watches.
    """

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._ring = [None] * limit
        self._next = 0  # the sequence number the next event gets
        self._readers = set()
        self._waiting = set()  # asyncio readers to wake on the next change
        self._closed = False

    def append(self, event):
        """Registry observer (reactor thread)."""
        with self._lock:
            if self._readers:
                self._ring[self._next % self.limit] = (event.kind, event.info)
            self._next += 1
            waiting, self._waiting = self._waiting, set()
        for reader in waiting:
            reader.wake()

    def join(self, reader):
        """Place ``reader`` at the next event; False when it may not (closed, or
        its call ended already).  On the reactor thread, with the replay snapshot."""
        with self._lock:
            if self._closed or reader.end_at is not None:
                return False
            reader.position = self._next
            self._readers.add(reader)
            return True

    def leave(self, reader):
        """The caller's call ended (any thread, once or more)."""
        with self._lock:
            reader.end_at = -1
            self._readers.discard(reader)
            self._waiting.discard(reader)
            if not self._readers:
                self._ring = [None] * self.limit  # nobody needs them: let them go
        reader.wake()

    def close(self):
        """End every reader after the events it has not read yet, now and later."""
        with self._lock:
            self._closed = True
            readers = list(self._readers)
            for reader in readers:
                if reader.end_at is None:
                    reader.end_at = self._next
        for reader in readers:
            reader.wake()

    def next_batch(self, reader):
        """The reader's next events, ``END_OF_WATCH``, or ``OVERFLOW`` when they are gone;
        None when there is nothing yet (``reader.wake`` is called on the next change)."""
        with self._lock:
            end = self._next if reader.end_at is None else min(reader.end_at, self._next)
            if reader.position is not None and reader.position < end:
                if reader.position < self._next - self.limit:
                    return OVERFLOW
                batch = [self._ring[n % self.limit] for n in range(reader.position, end)]
                reader.position = end
                return batch
            if reader.end_at is not None:
                return END_OF_WATCH
            self._waiting.add(reader)
            return None

    @property
    def readers(self):
        return len(self._readers)

    @property
    def kept(self):
        """Events held now: at most ``limit``, and none while nobody watches."""
        with self._lock:
            return sum(entry is not None for entry in self._ring)


class AsyncDiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """Discovery for grpc.aio: runs on the server's asyncio loop; a Watch costs no thread.

    ``tokens`` (ProxyTokens), if given, decides who sees which ids.  The event log
    follows the registry from the first Watch on (subscribed on the reactor thread)
    and keeps ``queue_limit`` changes (``--watch-queue-limit``).
    """

    _log = Logger()

    def __init__(self, reactor, registry, tokens, queue_limit):
        self._reactor = reactor
        self._registry = registry
        self._tokens = tokens
        self._events = EventLog(queue_limit)
        self._unsubscribe = None  # reactor thread only

    def _join(self, reader, replay):
        """Reactor thread: join the log; the entries to replay (sorted), None when
        the call is to end now."""
        if not self._events.join(reader):
            return None
        if self._unsubscribe is None:
            self._unsubscribe = self._registry.subscribe(self._events.append, updates=True)
        if not replay:
            return ()
        snapshot = self._registry.snapshot
        return [snapshot[i] for i in sorted(snapshot)]

    def _fell_behind(self, context):
        self._reactor.callFromThread(
            self._log.warn,
            "Discovery Watch from {peer} fell more than {limit} events behind; "
            "ending it with RESOURCE_EXHAUSTED",
            peer=context.peer(),
            limit=self._events.limit,
        )
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _overflow_details(self._events.limit)

    @staticmethod
    def responses(batch, visible, updates):
        """The Watch responses of ``batch`` ((kind, info) pairs) for a caller who
        sees the ids ``visible`` accepts, updates only if it asked (``updates``)."""
        return [_watch_response(kind, info) for kind, info in batch
                if visible(info.client_id) and (updates or kind != UPDATED)]

    def watching(self):
        """Watch calls in progress (that have joined the event log)."""
        return self._events.readers

    def events_kept(self):
        """Registry changes held for Watch callers now (the memory they cost)."""
        return self._events.kept

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        self._events.close()
        self._reactor.callFromThread(self._stop_following)

    def _stop_following(self):
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def _visible(self, context):
        visible = visible_ids(self._tokens, context.invocation_metadata())
        if visible is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        return visible

    async def ListGRPCServer(self, request, context):
        return list_response(self._registry.snapshot, await self._visible(context))

    async def WatchGRPCServer(self, request, context):
        visible = await self._visible(context)
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake():  # any thread
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:
                pass  # the loop is closed: the server is gone

        reader = WatchReader(wake, updates=request.updates)
        try:
            try:
                replay = await await_in_reactor(self._reactor, self._join, reader,
                                                request.replay, timeout=SUBSCRIBE_TIMEOUT)
            except (ReactorUnavailable, TimeoutError) as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"multiplexer is shutting down: {e}")
            if replay is None:
                return
            for info in replay:
                if visible(info.client_id):
                    await context.write(_watch_response(CONNECTED, info))
            while True:
                batch = self._events.next_batch(reader)
                if batch is None:
                    await arrived.wait()
                    arrived.clear()
                    continue
                if batch is END_OF_WATCH:
                    return
                if batch is OVERFLOW:
                    await context.abort(*self._fell_behind(context))
                for response in self.responses(batch, visible, reader.updates):
                    await context.write(response)
        finally:  # also when the caller cancels: the task is cancelled
            self._events.leave(reader)
