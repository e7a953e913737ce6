"""The Discovery API seen from the reactor: a Watch whose events can be awaited."""

import threading
import time

import grpc
from twisted.internet.defer import Deferred, succeed

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub

CONNECTED = pb.WatchGRPCServerResponse.EVENT_CONNECTED
DISCONNECTED = pb.WatchGRPCServerResponse.EVENT_DISCONNECTED


class Watcher:
    """``WatchGRPCServer`` in a thread; events reach the reactor with their time."""

    def __init__(self, reactor, proxy_address):
        self.reactor = reactor
        self.events = []  # (monotonic time, server id, event)
        self._waiters = []
        self._channel = grpc.insecure_channel(proxy_address)
        self._call = DiscoveryServiceStub(self._channel).WatchGRPCServer(
            pb.WatchGRPCServerRequest(replay=True))
        self._thread = threading.Thread(target=self._read, daemon=True, name="watch")
        self._thread.start()

    def _read(self):
        try:
            for response in self._call:
                self.reactor.callFromThread(self._event, time.monotonic(), response.server,
                                            response.event)
        except grpc.RpcError:
            pass

    def _event(self, when, server, event):
        entry = (when, server, event)
        self.events.append(entry)
        for item in list(self._waiters):
            match, waiter = item
            if match(entry):
                self._waiters.remove(item)
                waiter.callback(entry)

    def next(self, server, event, after=0.0, timeout=30.0):
        """A Deferred firing with (time, server, event) of the first such event seen
        at or after monotonic time ``after``."""
        def match(entry):
            return entry[1] == server and entry[2] == event and entry[0] >= after

        for entry in self.events:
            if match(entry):
                return succeed(entry)
        waiter = Deferred()
        self._waiters.append((match, waiter))
        return waiter.addTimeout(timeout, self.reactor)

    def close(self):
        """Cancel the Watch; its thread ends on its own (never joined on the reactor)."""
        self._call.cancel()
        self._channel.close()


def list_servers(proxy_address, timeout=30.0):
    """``ListGRPCServer`` (blocking): the ids, sorted."""
    with grpc.insecure_channel(proxy_address, options=[
            ("grpc.max_receive_message_length", -1)]) as channel:
        response = DiscoveryServiceStub(channel).ListGRPCServer(
            pb.ListGRPCServerRequest(), timeout=timeout)
    return list(response.servers)
