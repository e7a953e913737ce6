"""The Discovery API (grpc.multiplexer.v1.DiscoveryService) on the client registry.

List reads the registry's immutable snapshot from the grpc thread. Watch subscribes
on the reactor thread (through :func:`call_in_reactor`), taking the replay snapshot in
the same reactor turn, so no event is lost or seen twice; the reactor feeds events to
the watching grpc thread through a queue.
"""

import queue
import threading

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import CONNECTED, ClientInfo
from grpcmux.rpc.threads import ReactorUnavailable, call_in_reactor

_EVENTS = {
    CONNECTED: discovery_pb2.WatchGRPCServerResponse.EVENT_CONNECTED,
    "disconnected": discovery_pb2.WatchGRPCServerResponse.EVENT_DISCONNECTED,
}
# Put in a watcher's queue to end its stream.
_END = object()


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


def _watch_response(kind, info):
    return discovery_pb2.WatchGRPCServerResponse(
        server=info.client_id, event=_EVENTS[kind], details=server_details(info)
    )


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """Runs on grpc threads; touches the registry only through the reactor."""

    _log = Logger()

    def __init__(self, reactor, registry, subscribe_timeout=5.0):
        self._reactor = reactor
        self._registry = registry
        self._subscribe_timeout = subscribe_timeout
        self._lock = threading.Lock()
        self._watchers = set()  # queues of the running Watch calls
        self._closed = False

    @property
    def watcher_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    def ListGRPCServer(self, request, context):
        snapshot = self._registry.snapshot
        ids = sorted(snapshot)
        return discovery_pb2.ListGRPCServerResponse(
            servers=ids, details=[server_details(snapshot[i]) for i in ids]
        )

    def WatchGRPCServer(self, request, context):
        events = queue.Queue()
        with self._lock:
            if self._closed:
                return
            # Known before subscribing, so that close() always reaches this stream.
            self._watchers.add(events)

        def subscribe():
            unsubscribe = self._registry.subscribe(lambda e: events.put((e.kind, e.info)))
            replay = ()
            if request.replay:
                snapshot = self._registry.snapshot
                replay = [snapshot[i] for i in sorted(snapshot)]
            return unsubscribe, replay

        def departed(unsubscribe=None):
            events.put(_END)
            with self._lock:
                self._watchers.discard(events)
            if unsubscribe is not None:
                self._reactor.callFromThread(unsubscribe)

        try:
            unsubscribe, replay = call_in_reactor(
                self._reactor, subscribe, timeout=self._subscribe_timeout
            )
        except (ReactorUnavailable, TimeoutError) as e:
            departed()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"multiplexer is shutting down: {e}")
        if not context.add_callback(lambda: departed(unsubscribe)):
            departed(unsubscribe)  # the call ended already
            return
        for info in replay:
            yield _watch_response(CONNECTED, info)
        while True:
            item = events.get()
            if item is _END:
                return
            yield _watch_response(*item)

    def close(self):
        """End every Watch stream (status OK), now and later: the server is stopping."""
        with self._lock:
            self._closed = True
            watchers = list(self._watchers)
        for events in watchers:
            events.put(_END)
