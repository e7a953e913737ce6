"""Test helpers for the rpc tests: a scriptable gRPC backend and a breakable tunnel.

``Backend`` is a grpcio server on a UNIX socket serving ``/test.Echo/{Unary,
ServerStream, ClientStream, Bidi}`` on raw bytes. Request metadata steers it:

- ``x-echo-metadata``: send the received metadata back as response headers;
- ``x-header-<name>`` / ``x-trailer-<name>``: send ``<name>`` as header / trailer;
- ``x-fail: <CODE> <message>``: end with that status (after the headers), with the
  value of ``x-fail-details-bin`` as ``grpc-status-details-bin``;
- ``x-wait``: block until the call ends (cancel, deadline) and record how;
- ``x-count: N``: ServerStream answers N copies of the request;
- ``x-gzip``: compress the responses.

Every call is recorded in ``Backend.calls`` (a queue of ``CallRecord``).

``Mux`` is a started ProxyService with a registry, a Backend and a caller channel.

``Tunnel`` forwards a UNIX socket to another one through the reactor with
``grpcmux.splice``, standing in for the bridge; ``abort()`` breaks it like a dead tunnel.
"""

import queue
import threading
import time
from concurrent import futures

import grpc
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool

from grpcmux.config import ServerSettings
from grpcmux.registry import ClientInfo, ClientRegistry
from grpcmux.http2.status import UNAVAILABLE
from grpcmux.proxy import ProxyService
from grpcmux.splice import SpliceProtocol, splice

SERVICE = "test.Echo"
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# How long a backend waits for the call to end under x-wait (a test bug if reached).
WAIT_LIMIT = 20.0
# A caller that gives up at its deadline resets the call just as the backend's own
# deadline (counted from a transit later) expires, and either may arrive first: an
# end this close to the deadline is the deadline.
DEADLINE_SLACK = 0.1


class CallRecord:
    """What the backend saw of one call."""

    def __init__(self, method, metadata, time_remaining, via=None):
        self.method = method
        self.metadata = metadata
        self.via = via  # what the proxy added to ``via``, kept out of ``metadata``
        self.time_remaining = time_remaining
        self.ended = threading.Event()  # set when the call ended, however
        # Under x-wait: "cancelled" (by the caller), "deadline", or None (never ended).
        self.outcome = None
        self.settled = threading.Event()  # set once outcome is known


class Backend(grpc.GenericRpcHandler):
    """A grpcio server on ``unix:<socket_path>``; ``stop()`` when done."""

    def __init__(self, socket_path, tcp=False):
        self.socket_path = socket_path
        self.calls = queue.Queue()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(16), handlers=[self], options=UNLIMITED
        )
        self._server.add_insecure_port(f"unix:{socket_path}")
        # Also on loopback TCP, for peers that cannot dial a UNIX socket.
        self.tcp_address = (
            f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}" if tcp else None
        )
        self._server.start()

    def stop(self):
        self._server.stop(None).wait(10)

    def next_call(self, timeout=10.0) -> CallRecord:
        return self.calls.get(timeout=timeout)

    def service(self, handler_call_details):
        name = handler_call_details.method.rpartition("/")[2]
        kinds = {
            "Unary": grpc.unary_unary_rpc_method_handler,
            "ServerStream": grpc.unary_stream_rpc_method_handler,
            "ClientStream": grpc.stream_unary_rpc_method_handler,
            "Bidi": grpc.stream_stream_rpc_method_handler,
        }
        if handler_call_details.method.rpartition("/")[0] != "/" + SERVICE or name not in kinds:
            return None
        behavior = getattr(self, "_" + name.lower())
        idle = iter(()) if name in ("ServerStream", "Bidi") else b""
        method = handler_call_details.method
        return kinds[name](
            lambda request, context: self._run(method, behavior, idle, request, context))

    def _run(self, method, behavior, idle, request, context):
        seen = context.invocation_metadata()
        metadata = tuple((k, v) for k, v in seen if k not in ("user-agent", "via"))
        remaining = context.time_remaining()
        record = CallRecord(method, metadata,
                            remaining if remaining < 1e9 else None,
                            via=dict(seen).get("via"))
        context.add_callback(record.ended.set)
        self.calls.put(record)
        md = dict(metadata)
        headers = [(k[len("x-header-"):], v) for k, v in metadata if k.startswith("x-header-")]
        if "x-echo-metadata" in md:
            headers.extend(metadata)
        if "x-gzip" in md:
            context.set_compression(grpc.Compression.Gzip)
        if headers:
            context.send_initial_metadata(headers)
        context.set_trailing_metadata(
            [(k[len("x-trailer-"):], v) for k, v in metadata if k.startswith("x-trailer-")]
        )
        if "x-wait" in md:
            if record.ended.wait(WAIT_LIMIT):
                remaining = context.time_remaining()
                record.outcome = "deadline" if remaining < DEADLINE_SLACK else "cancelled"
            record.settled.set()
            return idle
        if "x-fail" in md:
            code_name, _, message = md["x-fail"].partition(" ")
            if "x-fail-details-bin" in md:
                context.set_trailing_metadata(
                    [("grpc-status-details-bin", md["x-fail-details-bin"])]
                )
            context.abort(grpc.StatusCode[code_name], message)
        return behavior(request, md)

    @staticmethod
    def _unary(request, md):
        return request

    @staticmethod
    def _serverstream(request, md):
        return iter([request] * int(md.get("x-count", "1")))

    @staticmethod
    def _clientstream(requests, md):
        return b"|".join(requests)

    @staticmethod
    def _bidi(requests, md):
        return (r for r in requests)


class _TrackedEnd(SpliceProtocol):
    """The tunnel's side of one connection; ``lost(end)`` is called when it ends."""

    def __init__(self, lost):
        self._lost = lost

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self._lost(self)


class Tunnel:
    """Listen on ``socket_path`` and splice every connection to ``target_path``."""

    def __init__(self, reactor, socket_path, target_path):
        self._reactor = reactor
        self._target = UNIXClientEndpoint(reactor, target_path)
        self.socket_path = socket_path
        self._ends = []
        self._idle_waiters = []
        factory = Factory.forProtocol(SpliceProtocol)
        factory.buildProtocol = self._accepted
        self._port = reactor.listenUNIX(socket_path, factory)

    def _accepted(self, addr):
        inbound = _TrackedEnd(self._lost)
        self._ends.append(inbound)
        d = self._target.connect(Factory.forProtocol(SpliceProtocol))
        d.addCallbacks(lambda outbound: splice(inbound, outbound),
                       lambda _: inbound.abort())
        return inbound

    def when_idle(self):
        """A Deferred firing once no connection runs through the tunnel."""
        if not self._ends:
            return succeed(None)
        waiter = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _lost(self, end):
        if end in self._ends:
            self._ends.remove(end)
        self._check_idle()

    def _check_idle(self):
        if not self._ends:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def abort(self):
        """Break every connection, as a dying tunnel would."""
        for end in self._ends:
            end.abort()
        self._ends.clear()

    def close(self):
        self.abort()
        return self._port.stopListening()


KINDS = {
    "Unary": "unary_unary",
    "ServerStream": "unary_stream",
    "ClientStream": "stream_unary",
    "Bidi": "stream_stream",
}


class Result:
    """Everything a caller saw of one call."""

    def __init__(self, call, responses):
        self.responses = responses
        self.headers = tuple(call.initial_metadata() or ())
        self.trailers = tuple(call.trailing_metadata() or ())
        self.code = call.code()
        self.details = call.details()


class PendingCall:
    """A call started by start_call; ``finish()`` waits for it (blocking)."""

    def __init__(self, call, streaming_response):
        self.call = call
        self._streaming_response = streaming_response

    def cancel(self):
        return self.call.cancel()

    def finish(self) -> Result:
        responses = []
        try:
            if self._streaming_response:
                responses.extend(self.call)
            else:
                responses.append(self.call.result())
        except grpc.RpcError:
            pass
        return Result(self.call, responses)


def route(client_id):
    """The metadata that sends a call through the proxy to ``client_id``."""
    return (("client-id", client_id),)


def start_call(channel, kind, request, metadata=(), timeout=10.0, **kwargs) -> PendingCall:
    """Start ``/test.Echo/<kind>``; ``request`` is bytes, or a list for client streams."""
    multicallable = getattr(channel, KINDS[kind])(f"/{SERVICE}/{kind}")
    if kind in ("ClientStream", "Bidi"):
        request = iter(request)
    if kind in ("Unary", "ClientStream"):
        call = multicallable.future(request, metadata=metadata, timeout=timeout, **kwargs)
        return PendingCall(call, False)
    return PendingCall(multicallable(request, metadata=metadata, timeout=timeout, **kwargs), True)


def invoke(channel, kind, request, metadata=(), timeout=10.0, **kwargs) -> Result:
    """Make one call and wait for it (blocking: run it in a thread)."""
    return start_call(channel, kind, request, metadata, timeout, **kwargs).finish()


# ProxyService arguments of the configurations tests run against.
ENGINES = {"router": {}}


def in_thread(reactor, fn, *args, wait=30.0, **kwargs):
    """``fn(*args, **kwargs)`` in the reactor's thread pool: blocking grpc client
    code must not run on the reactor. A Deferred that fails after ``wait`` seconds."""
    d = deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)
    return d.addTimeout(wait, reactor)


class SocketClient:
    """A router target standing in for a client's tunnel: a UNIX socket per connection."""

    def __init__(self, registry, info, endpoint):
        self.label = info.client_id
        self._registry = registry
        self._info = info
        self._endpoint = endpoint

    def connect(self, factory):
        return self._endpoint.connect(factory)

    def failure(self, connection, reason):
        gone = self._registry.get(self.label) is not self._info
        why = "it disconnected" if gone or reason is None else reason
        return UNAVAILABLE, f"client '{self.label}' is unavailable: {why}"


class Mux:
    """A started ProxyService on 127.0.0.1:0 with a registry, a Backend, a channel.

    ``settings`` are ServerSettings fields (``max_calls_per_client=``, ...);
    ``service_kwargs`` go to the ProxyService (``tls=``, ``tokens=``, ...).
    """

    def __init__(self, reactor, tmp_path, registry=None, settings=None, **service_kwargs):
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.registry = registry if registry is not None else ClientRegistry()
        self.backend = Backend(str(tmp_path / "backend.sock"))
        self.settings = ServerSettings(**{
            "proxy_listener": "127.0.0.1:0",
            "runtime_dir": str(tmp_path / "run"),
            "shutdown_grace": 1.0,
            **(settings or {}),
        })
        self.targets = {}
        self.service = ProxyService(reactor, self.registry, self.settings,
                                    tunnels=self.targets.get, **service_kwargs)
        self.service.startService()
        self.address = f"127.0.0.1:{self.service.port}"
        self.channel = grpc.insecure_channel(self.address, options=UNLIMITED)

    def connect(self, client_id, socket_path=None) -> ClientInfo:
        """Register a client reached at socket_path (default: the backend)."""
        endpoint = UNIXClientEndpoint(self.reactor, socket_path or self.backend.socket_path)
        info = ClientInfo(client_id, time.time(), "192.0.2.7:4567", "native", (("zone", "a"),))
        self.targets[client_id] = SocketClient(self.registry, info, endpoint)
        self.registry.add(info)
        return info

    def in_thread(self, fn, *args, timeout=20.0, **kwargs):
        """Run blocking grpc client code off the reactor; a Deferred with a timeout."""
        return in_thread(self.reactor, fn, *args, wait=timeout, **kwargs)

    def invoke(self, kind, request, metadata=(), timeout=10.0, channel=None, **kwargs):
        """A Deferred firing with the Result of one call through the proxy."""
        return self.in_thread(invoke, channel or self.channel, kind, request, metadata,
                              timeout, timeout=timeout + 10.0, **kwargs)

    async def stop(self):
        self.channel.close()
        if self.service.running:
            await self.service.stopService().addTimeout(20.0, self.reactor)
        await self.in_thread(self.backend.stop)
