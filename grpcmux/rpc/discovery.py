"""The Discovery API (grpc.multiplexer.v1.DiscoveryService) on the client registry.

List reads the registry's immutable snapshot. Watch subscribes on the reactor thread
and takes the replay snapshot in the same reactor turn, so no event is lost or seen
twice; the reactor then pushes events to the watching call (a thread-safe queue for
the threaded server, the asyncio loop for grpc.aio). A watcher that leaves is
unsubscribed on the reactor thread, in order with its subscription, so even one
that leaves before its subscription happened leaves nothing behind.

With proxy tokens configured, List and Watch require a known token in the
``grpcmux-token`` metadata (else UNAUTHENTICATED) and show only the ids that token
may call: the listing is the map of what can be reached, so it is no more public
than the clients themselves.
"""

import asyncio
import queue
import threading

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

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
from grpcmux.rpc.threads import ReactorUnavailable, await_in_reactor, call_in_reactor
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
# Pushed to a watcher to end its stream.
_END = object()
# How long a new watcher waits for the reactor to subscribe it.
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


class _Subscription:
    """One watcher's registry subscription. Both methods run on the reactor thread."""

    def __init__(self, registry, push, visible=_everyone, updates=False):
        self._registry = registry
        self._push = push
        self._visible = visible
        self._updates = updates
        self._unsubscribe = None
        self._ended = False

    def start(self, replay):
        """Subscribe; returns the entries to replay (sorted) when asked to."""
        if self._ended:
            return ()
        if self._updates:
            self._unsubscribe = self._registry.subscribe(self._changed, updates=True)
        else:
            self._unsubscribe = self._registry.subscribe(self._changed)
        snapshot = self._registry.snapshot
        return [snapshot[i] for i in sorted(snapshot) if self._visible(i)] if replay else ()

    def _changed(self, event):
        if self._visible(event.info.client_id):
            self._push((event.kind, event.info))

    def end(self):
        self._ended = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class _Watchers:
    """The push functions of running Watch calls, so that close() can end them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pushes = set()
        self._closed = False

    def add(self, push):
        """Track a watcher; False when closed already (the call should end)."""
        with self._lock:
            if not self._closed:
                self._pushes.add(push)
            return not self._closed

    def discard(self, push):
        with self._lock:
            self._pushes.discard(push)

    def close(self):
        with self._lock:
            self._closed = True
            pushes = list(self._pushes)
        for push in pushes:
            push(_END)


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """For the threaded grpc server: each Watch holds a worker thread.

    ``tokens`` (ProxyTokens), if given, decides who sees which ids.
    """

    def __init__(self, reactor, registry, tokens=None):
        self._reactor = reactor
        self._registry = registry
        self._tokens = tokens
        self._watchers = _Watchers()

    def _visible(self, context):
        visible = visible_ids(self._tokens, context.invocation_metadata())
        if visible is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        return visible

    def ListGRPCServer(self, request, context):
        return list_response(self._registry.snapshot, self._visible(context))

    def WatchGRPCServer(self, request, context):
        events = queue.Queue()
        subscription = _Subscription(self._registry, events.put, self._visible(context),
                                     request.updates)

        def departed():
            events.put(_END)
            self._watchers.discard(events.put)
            self._reactor.callFromThread(subscription.end)

        # Known before subscribing, so that close() always reaches this stream.
        if not self._watchers.add(events.put):
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
            item = events.get()
            if item is _END:
                return
            yield _watch_response(*item)

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        self._watchers.close()


class AsyncDiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """For grpc.aio: runs on the server's asyncio loop; a Watch costs no thread.

    ``tokens`` (ProxyTokens), if given, decides who sees which ids.
    """

    def __init__(self, reactor, registry, tokens=None):
        self._reactor = reactor
        self._registry = registry
        self._tokens = tokens
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
        events = asyncio.Queue()

        def push(item):  # any thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                pass  # the loop is closed: the server is gone

        subscription = _Subscription(self._registry, push, visible, request.updates)
        if not self._watchers.add(push):
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
                item = await events.get()
                if item is _END:
                    return
                await context.write(_watch_response(*item))
        finally:  # also when the caller cancels: the task is cancelled
            self._watchers.discard(push)
            self._reactor.callFromThread(subscription.end)

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        self._watchers.close()
