"""The Discovery API (grpc.multiplexer.v1.DiscoveryService) on the client registry.

List reads the registry's immutable snapshot. Watch subscribes on the reactor thread
and takes the replay snapshot in the same reactor turn, so no event is lost or seen
twice; the reactor then pushes events to the watching call (a thread-safe queue for
the threaded server, the asyncio loop for grpc.aio). A watcher that leaves is
unsubscribed on the reactor thread, in order with its subscription, so even one
that leaves before its subscription happened leaves nothing behind.  At most
``queue_limit`` events wait for one watcher: one that falls further behind is
unsubscribed, its waiting events are dropped and its stream ends with
RESOURCE_EXHAUSTED (it can watch again with replay to catch up).

With proxy tokens configured, List and Watch require a known token in the
``grpcmux-token`` metadata (else UNAUTHENTICATED) and show only the ids that token
may call: the listing is the map of what can be reached, so it is no more public
than the clients themselves.
"""

import asyncio
import threading
from collections import deque

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import CONNECTED, DISCONNECTED, ClientInfo
from grpcmux.rpc.security import UNAUTHENTICATED_DETAILS
from grpcmux.rpc.threads import ReactorUnavailable, await_in_reactor, call_in_reactor
from grpcmux.tokens import ProxyTokens

_EVENTS = {
    CONNECTED: discovery_pb2.WatchGRPCServerResponse.EVENT_CONNECTED,
    DISCONNECTED: discovery_pb2.WatchGRPCServerResponse.EVENT_DISCONNECTED,
}
# Pushed to a watcher to end its stream.
_END = object()
# Ends a watcher's stream in place of its events when it fell too far behind.
_OVERFLOW = object()
# How long a new watcher waits for the reactor to subscribe it.
SUBSCRIBE_TIMEOUT = 5.0
# Events that may wait for one watcher (--watch-queue-limit).
WATCH_QUEUE_LIMIT = 1000


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


class _Feed:
    """One watcher's events waiting to be sent: at most ``limit``, any thread.

    The reactor puts events, the call takes them.  An event beyond the limit drops
    the waiting ones and ends the feed with ``_OVERFLOW``; ``_END`` ends it after
    them.  ``wake`` (called on the putting thread) tells a consumer that found the
    feed empty (``take`` returned None) that something arrived.
    """

    def __init__(self, limit, wake=None):
        self.limit = limit
        self._wake = wake
        self._ready = threading.Condition()
        self._items = deque()
        self._end = None
        self._waiting = False

    @property
    def overflowed(self):
        return self._end is _OVERFLOW

    def put(self, item):
        """Add an event or ``_END``; False once the feed has ended."""
        with self._ready:
            if self._end is not None:
                return False
            if item is _END:
                self._end = _END
            elif len(self._items) >= self.limit:
                self._items.clear()
                self._end = _OVERFLOW
            else:
                self._items.append(item)
            self._ready.notify()
            wake, self._waiting = self._waiting and self._wake, False
        if wake:
            wake()
        return self._end is None

    def get(self):
        """The next event, or how the feed ended; blocks (for a thread)."""
        with self._ready:
            while not self._items and self._end is None:
                self._ready.wait()
            return self._items.popleft() if self._items else self._end

    def take(self):
        """Like ``get`` without blocking: None when nothing is there yet."""
        with self._ready:
            if self._items:
                return self._items.popleft()
            self._waiting = self._end is None
            return self._end

    def __len__(self):
        return len(self._items)


class _Subscription:
    """One watcher's registry subscription. Both methods run on the reactor thread."""

    _log = Logger()

    def __init__(self, registry, feed, visible=_everyone, peer=None):
        self._registry = registry
        self._feed = feed
        self._visible = visible
        self._peer = peer
        self._unsubscribe = None
        self._ended = False

    def start(self, replay):
        """Subscribe; returns the entries to replay (sorted) when asked to."""
        if self._ended:
            return ()
        self._unsubscribe = self._registry.subscribe(self._changed)
        snapshot = self._registry.snapshot
        return [snapshot[i] for i in sorted(snapshot) if self._visible(i)] if replay else ()

    def _changed(self, event):
        if self._visible(event.info.client_id) and not self._feed.put((event.kind, event.info)):
            if self._feed.overflowed:
                self._log.warn(
                    "Discovery Watch from {peer} fell more than {limit} events behind; "
                    "ending it with RESOURCE_EXHAUSTED", peer=self._peer,
                    limit=self._feed.limit)
            self.end()

    def end(self):
        self._ended = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class _Watchers:
    """The feeds of running Watch calls, so that close() can end them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._feeds = set()
        self._closed = False

    def add(self, feed):
        """Track a watcher; False when closed already (the call should end)."""
        with self._lock:
            if not self._closed:
                self._feeds.add(feed)
            return not self._closed

    def discard(self, feed):
        with self._lock:
            self._feeds.discard(feed)

    def close(self):
        with self._lock:
            self._closed = True
            feeds = list(self._feeds)
        for feed in feeds:
            feed.put(_END)

    def queued_events(self):
        with self._lock:
            return sum(map(len, self._feeds))


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """For the threaded grpc server: each Watch holds a worker thread.

    ``tokens`` (ProxyTokens), if given, decides who sees which ids.
    """

    def __init__(self, reactor, registry, tokens=None, queue_limit=WATCH_QUEUE_LIMIT):
        self._reactor = reactor
        self._registry = registry
        self._tokens = tokens
        self._queue_limit = queue_limit
        self._watchers = _Watchers()

    def _visible(self, context):
        visible = visible_ids(self._tokens, context.invocation_metadata())
        if visible is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        return visible

    def ListGRPCServer(self, request, context):
        return list_response(self._registry.snapshot, self._visible(context))

    def WatchGRPCServer(self, request, context):
        feed = _Feed(self._queue_limit)
        subscription = _Subscription(self._registry, feed, self._visible(context),
                                     context.peer())

        def departed():
            feed.put(_END)
            self._watchers.discard(feed)
            self._reactor.callFromThread(subscription.end)

        # Known before subscribing, so that close() always reaches this stream.
        if not self._watchers.add(feed):
            return
        try:
            replay = call_in_reactor(self._reactor, subscription.start, request.replay,
                                     timeout=SUBSCRIBE_TIMEOUT)
        except (ReactorUnavailable, TimeoutError) as e:
            departed()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"multiplexer is shutting down: {e}")
        # False when the call ended already.
        if context.add_callback(departed) is False:
            departed()
        for info in replay:
            yield _watch_response(CONNECTED, info)
        while True:
            item = feed.get()
            if item is _END:
                return
            if item is _OVERFLOW:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _overflow_details(feed.limit))
            yield _watch_response(*item)

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        self._watchers.close()

    def queued_events(self):
        """Events waiting for Watch callers, all of them together."""
        return self._watchers.queued_events()


class AsyncDiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """For grpc.aio: runs on the server's asyncio loop; a Watch costs no thread.

    ``tokens`` (ProxyTokens), if given, decides who sees which ids.
    """

    def __init__(self, reactor, registry, tokens=None, queue_limit=WATCH_QUEUE_LIMIT):
        self._reactor = reactor
        self._registry = registry
        self._tokens = tokens
        self._queue_limit = queue_limit
        self._watchers = _Watchers()

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

        feed = _Feed(self._queue_limit, wake)
        subscription = _Subscription(self._registry, feed, visible, context.peer())
        if not self._watchers.add(feed):
            return
        try:
            try:
                replay = await await_in_reactor(self._reactor, subscription.start,
                                                request.replay, timeout=SUBSCRIBE_TIMEOUT)
            except (ReactorUnavailable, TimeoutError) as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"multiplexer is shutting down: {e}")
            for info in replay:
                await context.write(_watch_response(CONNECTED, info))
            while True:
                item = feed.take()
                if item is None:
                    await arrived.wait()
                    arrived.clear()
                    continue
                if item is _END:
                    return
                if item is _OVERFLOW:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        _overflow_details(feed.limit))
                await context.write(_watch_response(*item))
        finally:  # also when the caller cancels: the task is cancelled
            self._watchers.discard(feed)
            self._reactor.callFromThread(subscription.end)

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        self._watchers.close()

    def queued_events(self):
        """Events waiting for Watch callers, all of them together."""
        return self._watchers.queued_events()
