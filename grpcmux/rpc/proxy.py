"""Transparent gRPC pass-through: route each call to one client's gRPC server.

Every method is handled as stream-stream without serializers, so the four call kinds
pass through as bytes, of any size. The call is forwarded over a channel to the
client's bridge socket (``unix:<socket_path>``), one channel per connected client,
created on first use and closed when the client leaves the registry.

Routing, first match wins: the ``client-id`` metadata (exactly one value; stripped
before forwarding), else an ``:authority`` of ``<id>.<authority_domain>[:port]``, else
``default_client_id``. Discovery is always answered here; health and reflection are
answered here when the call names no client (metadata or authority). A client with
``max_calls_per_client`` calls in flight gets no more: RESOURCE_EXHAUSTED.

With proxy tokens (:class:`grpcmux.tokens.ProxyTokens`) a forwarded call must carry
a known token in the ``grpcmux-token`` metadata (else UNAUTHENTICATED) that may reach
the id it routes to (else PERMISSION_DENIED, decided before the registry is read, so
the answer does not tell whether that client is connected). The token, like
``client-id``, is stripped before forwarding.

Two engines share that logic:

- :class:`AsyncProxy` for ``grpc.aio``: every call is a task on one asyncio loop, so
  thousands of streams cost no thread each. grpcio's asyncio server does not expose
  a call's ``:authority``, so it cannot route by authority.
- :class:`ThreadedProxy` for the threaded ``grpc.server``: one worker thread per call
  (plus one per streaming request), used when authority routing is configured.

Both read the registry only through its immutable snapshot.
"""

import asyncio
import contextlib
import threading
import time

import grpc
from grpc._cython import cygrpc
from twisted.logger import Logger

from grpcmux.registry import NOT_SERVING, ClientInfo
from grpcmux.rpc.security import UNAUTHENTICATED_DETAILS
from grpcmux.tokens import PROXY_TOKEN_METADATA_KEY, ProxyTokens

CLIENT_ID_KEY = "client-id"
_STRIPPED_KEYS = frozenset([CLIENT_ID_KEY, PROXY_TOKEN_METADATA_KEY, "user-agent"])
# Codes a broken or closed channel produces on its own.
_CHANNEL_CODES = frozenset([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
_READY = grpc.ChannelConnectivity.READY
# How long a channel must stay READY after a bare UNAVAILABLE/CANCELLED for the
# status to count as the backend's own.
_SETTLE_TIME = 0.25


def message_size_options(max_message_size=None):
    """grpc options bounding messages by ``max_message_size`` bytes (None: unbounded)."""
    limit = -1 if max_message_size is None else max_message_size
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class RoutingError(Exception):
    """A call that cannot be routed; carries the status to answer with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _names_client_id(metadata):
    return any(k == CLIENT_ID_KEY for k, _ in metadata)


def _forwarded_metadata(metadata):
    return [
        (k, v) for k, v in metadata
        if k not in _STRIPPED_KEYS and not k.startswith(("grpc-", ":"))
    ]


class _Proxy(grpc.GenericRpcHandler):
    """What both engines share: routing, the channel table, status classification.

    ``local`` maps full method names to handlers always served here (Discovery);
    ``local_unrouted`` maps those served here only when the call names no client
    (health, reflection). ``tokens`` (ProxyTokens), if given, authorizes every
    forwarded call.
    """

    _log = Logger()

    def __init__(self, registry, authority_domain=None, default_client_id=None,
                 max_message_size=None, local=None, local_unrouted=None, call_observer=None,
                 max_calls_per_client=None, tokens=None):
        self._registry = registry
        self._max_calls_per_client = max_calls_per_client  # None: unbounded
        self._tokens = tokens
        # call_observer() -> finished(code_name), for metrics; called on grpc's threads.
        self._call_observer = call_observer
        self._authority_suffix = (
            "." + authority_domain.strip(".").lower() if authority_domain else None
        )
        self._default_client_id = default_client_id
        self._local = dict(local or {})
        self._local_unrouted = dict(local_unrouted or {})
        self._channel_options = message_size_options(max_message_size) + [
            # The proxy must not buffer or replay requests; the caller decides.
            ("grpc.enable_retries", 0),
            # Reconnecting to a local socket is cheap: after a tunnel or backend
            # outage, calls work again within a second, not grpc's default 2 minutes.
            # (Not grpc.min_reconnect_backoff_ms: grpc core also takes it as the
            # connect timeout, and a loaded machine needs more than 100 ms.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # No HTTP/2 keepalive pings: grpc servers answer frequent pings with
            # GOAWAY (too_many_pings); the tunnel's own pings watch the connection.
            ("grpc.keepalive_time_ms", 2**31 - 1),
        ]
        self._lock = threading.Lock()
        self._backends = {}  # (client_id, socket_path) -> backend

    # routing

    def named_client(self, metadata, authority=None):
        """The client a call names by metadata or authority; None if none."""
        values = [v for k, v in metadata if k == CLIENT_ID_KEY]
        if len(values) > 1:
            raise RoutingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata '{CLIENT_ID_KEY}' must have exactly one value, got {len(values)}",
            )
        if values:
            if not values[0]:
                raise RoutingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"metadata '{CLIENT_ID_KEY}' is empty")
            return values[0]
        if self._authority_suffix is not None and authority:
            return self._id_from_authority(authority)
        return None

    def route(self, metadata, authority=None):
        """The client a call goes to, if its caller may call it; RoutingError if not."""
        patterns = self._token_patterns(metadata)
        client_id = self.named_client(metadata, authority) or self._default_client_id
        if client_id is None:
            raise RoutingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no target client: set the metadata '{CLIENT_ID_KEY}' to a client id",
            )
        if patterns is not None and not ProxyTokens.allows(patterns, client_id):
            raise RoutingError(grpc.StatusCode.PERMISSION_DENIED,
                               f"this proxy token may not call client '{client_id}'")
        return client_id

    def _token_patterns(self, metadata):
        """The ids the call's proxy token may reach; None when no tokens are configured."""
        if self._tokens is None:
            return None
        patterns = self._tokens.patterns_in(metadata)
        if patterns is None:
            raise RoutingError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        return patterns

    def _id_from_authority(self, authority):
        host = authority
        if not host.endswith("]"):  # not a bare IPv6 literal
            name, sep, port = host.rpartition(":")
            if sep and port.isdigit():
                host = name
        if host.lower().endswith(self._authority_suffix):
            return host[: -len(self._authority_suffix)] or None
        return None

    # channels

    def channel_for(self, client_id):
        """The channel to a connected client (made if need be); RoutingError if none.

        For the aio engine, call it on the server's loop.
        """
        return self._backend(client_id).channel

    def _backend(self, client_id):
        """The backend for a connected client; RoutingError if it is not connected."""
        info = self._registry.snapshot.get(client_id)
        if info is not None:
            if info.health == NOT_SERVING:
                raise RoutingError(grpc.StatusCode.UNAVAILABLE,
                                   f"client '{client_id}' reports its gRPC server down")
            key = (info.client_id, info.socket_path)
            with self._lock:
                backend = self._backends.get(key)
                if backend is None:
                    backend = self._backends[key] = self._new_backend(info)
            # The client may have left between the snapshot read and the insertion,
            # with client_gone() finding nothing; the snapshot changes before that call.
            # (Same connection, same socket; its health may have changed meanwhile.)
            current = self._registry.snapshot.get(info.client_id)
            if current is not None and current.socket_path == info.socket_path:
                return backend
            self.client_gone(info)
        raise RoutingError(grpc.StatusCode.NOT_FOUND, f"client '{client_id}' is not connected")

    def _take_call_slot(self, backend):
        """Count one more call in flight to the backend's client; RoutingError past the limit."""
        limit = self._max_calls_per_client
        with self._lock:
            if limit is not None and backend.active >= limit:
                raise RoutingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client '{backend.info.client_id}' already has {limit} calls in "
                    "progress, the most allowed; retry later",
                )
            backend.active += 1

    def _free_call_slot(self, backend):
        with self._lock:
            backend.active -= 1

    @contextlib.contextmanager
    def _slot_returned_on_error(self, backend):
        """Give the call slot back if the backend call cannot even be created."""
        try:
            yield
        except BaseException:
            self._free_call_slot(backend)
            raise

    def _pop_backend(self, info):
        with self._lock:
            return self._backends.pop((info.client_id, info.socket_path), None)

    def _pop_all_backends(self):
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        return backends

    # statuses

    @contextlib.contextmanager
    def _observed(self, context):
        """Tell ``call_observer`` about a forwarded call and the status it ended with."""
        if self._call_observer is None:
            yield
            return
        finished = self._call_observer()
        code = None
        try:
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            code = context.code() or code
            if code is None and not getattr(context, "is_active", lambda: True)():
                code = grpc.StatusCode.CANCELLED  # threaded engine: the caller left
            finished((code or grpc.StatusCode.OK).name)

    @staticmethod
    def _state_decides(code, headers, trailers):
        """Whether only the channel's state can tell where this status came from.

        grpcio does not say. A server's answer usually carries metadata, and it
        leaves the connection working; a broken tunnel leaves the channel not READY.
        """
        return code in _CHANNEL_CODES and not headers and not trailers

    def _final_status(self, backend, code, details, broken):
        """The status to give the caller; ``broken``: it came from the channel.

        Only failures of the channel (or of a client that left) become UNAVAILABLE
        naming the client; the backend's own statuses pass unchanged.
        """
        if not broken:
            return code, details
        client_id = backend.info.client_id
        self._log.info("call to client {client_id} failed in transit: {code} {details}",
                       client_id=client_id, code=code, details=details)
        if backend.closed:
            details = "it disconnected"  # grpc's words would be about our own cancel
        return grpc.StatusCode.UNAVAILABLE, f"client '{client_id}' is unavailable: {details}"


class _Backend:
    """The channel to one connected client's bridge socket."""

    def __init__(self, info: ClientInfo, channel):
        self.info = info
        self.channel = channel
        self.calls = set()  # calls in flight
        self.active = 0  # calls counted against the per-client limit
        # Set when the proxy closed the channel because the client left: whatever
        # then fails on it failed because of the tunnel.
        self.closed = False
        # Set when the client is leaving on its own: no new calls, and the channel
        # closes once the calls in flight are done (which lets the client finish).
        self.retiring = False
        self.channel_closed = False


class AsyncProxy(_Proxy):
    """The grpc.aio engine; every method runs on the server's asyncio loop."""

    def __init__(self, registry, loop, **kwargs):
        if kwargs.get("authority_domain"):
            raise ValueError("grpc.aio does not expose :authority; use ThreadedProxy")
        super().__init__(registry, **kwargs)
        self._loop = loop
        self._closing = set()  # close() tasks, held so that they are not collected

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._local.get(method)
        if handler is None and not _names_client_id(handler_call_details.invocation_metadata):
            handler = self._local_unrouted.get(method)
        if handler is not None:
            return handler

        async def forward(requests, context):  # grpc.aio wants a coroutine function
            with self._observed(context):
                await self._forward(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(forward)

    def client_gone(self, info: ClientInfo) -> None:
        """Close the channel to a client that left the registry (any thread)."""
        self._loop.call_soon_threadsafe(self._close_backend, info)

    def client_leaving(self, info: ClientInfo) -> None:
        """Retire the channel to a client that is leaving: its calls may finish."""
        self._loop.call_soon_threadsafe(self._retire_backend, info)

    def _retire_backend(self, info):
        backend = self._pop_backend(info)
        if backend is not None:
            backend.retiring = True
            self._close_if_idle(backend)

    def _close_if_idle(self, backend):
        if backend.retiring and not backend.calls and not backend.channel_closed:
            backend.channel_closed = True
            task = self._loop.create_task(backend.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _close_backend(self, info):
        backend = self._pop_backend(info)
        if backend is not None:
            backend.closed = True
            # grpc.aio's close() does not find calls relayed from our own tasks.
            for call in list(backend.calls):
                call.cancel()
            task = self._loop.create_task(backend.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every channel (the server is stopping). On the loop."""
        backends = self._pop_all_backends()
        for backend in backends:
            backend.closed = True
        await asyncio.gather(*(b.channel.close() for b in backends))

    def _new_backend(self, info):
        channel = grpc.aio.insecure_channel(f"unix:{info.socket_path}",
                                            options=self._channel_options)
        return _Backend(info, channel)

    async def _forward(self, method, requests, context):
        try:
            backend = self._backend(self.route(context.invocation_metadata()))
            self._take_call_slot(backend)
        except RoutingError as e:
            await context.abort(e.code, e.message)
        with self._slot_returned_on_error(backend):
            call = backend.channel.stream_stream(method)(
                timeout=context.time_remaining(),
                metadata=_forwarded_metadata(context.invocation_metadata()),
            )
        # Our own pump, not grpc's request_iterator: grpc.aio turns a request written
        # after the backend already answered into INTERNAL, hiding the real status.
        pump = asyncio.ensure_future(_pump(requests, call))
        backend.calls.add(call)
        try:
            headers = await call.initial_metadata()
            if headers:
                await context.send_initial_metadata(tuple(headers))
            async for message in call:
                await context.write(message)
        except grpc.RpcError:
            pass  # the call itself carries the status, read below
        except asyncio.CancelledError:
            if not (backend.closed and call.cancelled()) or _caller_left(context):
                raise
            # client_gone() cancelled the call: answer for the departed client.
        finally:
            backend.calls.discard(call)
            self._free_call_slot(backend)
            call.cancel()  # a no-op once done; cancels when the caller went away
            pump.cancel()
            self._close_if_idle(backend)
        code = await call.code()
        trailers = await call.trailing_metadata() or ()
        context.set_trailing_metadata(tuple(trailers))
        if code is grpc.StatusCode.OK:
            return
        # A retired channel may already be closed (this was its last call).
        broken = backend.closed or (
            self._state_decides(code, await call.initial_metadata(), trailers)
            and (backend.channel_closed or not await _still_ready(backend.channel)))
        code, details = self._final_status(backend, code, await call.details(), broken)
        context.set_code(code)
        context.set_details(details)


class ThreadedProxy(_Proxy):
    """The threaded engine; grpc runs each call on a worker thread of its own."""

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._local.get(method)
        if handler is not None:
            return handler
        local = self._local_unrouted.get(method)
        if local is not None and not _names_client_id(handler_call_details.invocation_metadata):
            # Only the call context knows the authority, which may still name a client.
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._local_or_forward(local, method, requests, context))
        return grpc.stream_stream_rpc_method_handler(
            lambda requests, context: self._observed_forward(method, requests, context))

    def client_gone(self, info: ClientInfo) -> None:
        """Close the channel to a client that left the registry (blocks briefly)."""
        backend = self._pop_backend(info)
        if backend is not None:
            backend.closed = True
            backend.channel.close()

    def client_leaving(self, info: ClientInfo) -> None:
        """Retire the channel to a client that is leaving: its calls may finish."""
        backend = self._pop_backend(info)
        if backend is not None:
            backend.retiring = True
            self._close_if_idle(backend)

    def _close_if_idle(self, backend):
        with self._lock:
            if not backend.retiring or backend.calls or backend.channel_closed:
                return
            backend.channel_closed = True
        backend.channel.close()

    def close(self) -> None:
        """Close every channel (the server is stopping)."""
        for backend in self._pop_all_backends():
            backend.closed = True
            backend.channel.close()

    def _new_backend(self, info):
        channel = grpc.insecure_channel(f"unix:{info.socket_path}",
                                        options=self._channel_options)
        return _Backend(info, channel)

    def _local_or_forward(self, local, method, requests, context):
        try:
            named = self.named_client(context.invocation_metadata(), _authority(context))
        except RoutingError as e:
            context.abort(e.code, e.message)
        if named is None:
            return _serve_locally(local, requests, context)
        return self._observed_forward(method, requests, context)

    def _observed_forward(self, method, requests, context):
        with self._observed(context):
            yield from self._forward(method, requests, context)

    def _forward(self, method, requests, context):
        try:
            client_id = self.route(context.invocation_metadata(), _authority(context))
            backend = self._backend(client_id)
            self._take_call_slot(backend)
        except RoutingError as e:
            context.abort(e.code, e.message)
        remaining = context.time_remaining()
        with self._slot_returned_on_error(backend):
            call = backend.channel.stream_stream(method)(
                requests,
                # Without a deadline grpcio reports roughly the largest int64 in seconds.
                timeout=remaining if remaining < 1e9 else None,
                metadata=_forwarded_metadata(context.invocation_metadata()),
            )
        # Fires on every end of the caller's call, cancellation included.
        context.add_callback(call.cancel)
        return self._relay(backend, call, context)

    def _relay(self, backend, call, context):
        with self._lock:
            backend.calls.add(call)
        try:
            yield from self._relay_messages(backend, call, context)
        finally:
            with self._lock:
                backend.calls.discard(call)
            self._free_call_slot(backend)
            self._close_if_idle(backend)

    def _relay_messages(self, backend, call, context):
        try:
            headers = call.initial_metadata()
            if headers:
                context.send_initial_metadata(headers)
            for message in call:
                yield message
        except grpc.RpcError:
            pass  # the call itself carries the status, read below
        if not context.is_active():
            return  # the caller left; nobody is listening
        code = call.code()
        trailers = call.trailing_metadata() or ()
        context.set_trailing_metadata(trailers)
        if code is grpc.StatusCode.OK:
            return
        broken = backend.closed or (
            self._state_decides(code, call.initial_metadata(), trailers)
            and not _still_ready_sync(backend.channel))
        code, details = self._final_status(backend, code, call.details(), broken)
        context.set_code(code)
        context.set_details(details)


async def _pump(requests, call):
    """Forward the caller's requests to the backend call, then half-close it."""
    try:
        async for request in requests:
            if not await _send(call, request):
                return
        await call.done_writing()
    except Exception:  # noqa: BLE001 - either side ended; the call's status says how
        pass


async def _send(call, request):
    """``call.write(request)``; False once the call has ended.

    grpc.aio's write() records a write that loses the race with the backend's final
    status as INTERNAL, replacing the status the backend sent (an immediate
    UNIMPLEMENTED, say). Where grpcio's internals allow, send without that.
    """
    cython_call = getattr(call, "_cython_call", None)
    metadata_sent = getattr(call, "_metadata_sent", None)
    if cython_call is None or metadata_sent is None:
        await call.write(request)
        return True
    if call.done():
        return False
    await metadata_sent.wait()
    try:
        await cython_call.send_serialized_message(request)
    except cygrpc.InternalError:
        return False
    return True


def _caller_left(context):
    """Whether the running aio handler task is being cancelled (the caller left)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
    return cancelling() > 0 if cancelling is not None else context.cancelled()


async def _still_ready(channel):
    """Whether an aio channel is READY and stays so for a moment.

    A connection's loss may reach a call before the channel's state: wait a little
    for the state to follow.
    """
    if channel.get_state() is not _READY:
        return False
    try:
        await asyncio.wait_for(channel.wait_for_state_change(_READY), _SETTLE_TIME)
    except asyncio.TimeoutError:
        return True
    return channel.get_state() is _READY


def _still_ready_sync(channel):
    """Like _still_ready for a threaded channel (on a grpc worker thread)."""
    deadline = time.monotonic() + _SETTLE_TIME
    while _sync_channel_ready(channel):
        if time.monotonic() >= deadline:
            return True
        time.sleep(_SETTLE_TIME / 20)
    return False


def _sync_channel_ready(channel):
    # grpcio has no public synchronous state query on a threaded channel.
    try:
        state = channel._channel.check_connectivity_state(False)
    except AttributeError:
        return False
    return state == _READY.value[0]


def _authority(context):
    """The call's ``:authority``; grpcio exposes it only on this private path."""
    try:
        host = context._rpc_event.call_details.host
    except AttributeError:
        return None
    return host.decode("ascii", "replace") if isinstance(host, bytes) else host


def _serve_locally(handler, requests, context):
    """Run a locally registered (serializing) handler on the raw byte stream."""
    decode = handler.request_deserializer or (lambda b: b)
    encode = handler.response_serializer or (lambda m: m)
    decoded = (decode(r) for r in requests)
    if handler.request_streaming:
        request = decoded
    else:
        request = next(decoded, None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected one request message")
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
        for response in behavior(request, context):
            yield encode(response)
    else:
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
        yield encode(behavior(request, context))


class HandlerTable:
    """Stands in for a grpc server to collect what ``add_*_to_server`` registers."""

    def __init__(self):
        self.handlers = {}

    def add_generic_rpc_handlers(self, generic_handlers):
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(self, service_name, method_handlers):
        for name, handler in method_handlers.items():
            self.handlers[f"/{service_name}/{name}"] = handler
