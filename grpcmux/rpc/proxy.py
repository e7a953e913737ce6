"""Transparent gRPC pass-through: route each call to one client's gRPC server.

Every method is handled as stream-stream without serializers, so the four call kinds
pass through as bytes, of any size. The call is forwarded over a channel to the
client's bridge socket (``unix:<socket_path>``), one channel per connected client,
created on first use and closed when the client leaves the registry.

Routing, first match wins: the ``client-id`` metadata (exactly one value; stripped
before forwarding), else an ``:authority`` of ``<id>.<authority_domain>[:port]``, else
``default_client_id``. Discovery is always answered here; health and reflection are
answered here when the call names no client (metadata or authority).

Runs on grpc's own threads (one per active call); it reads the registry only through
its immutable snapshot.
"""

import threading

import grpc
from twisted.logger import Logger

from grpcmux.registry import ClientInfo

CLIENT_ID_KEY = "client-id"
_STRIPPED_KEYS = frozenset([CLIENT_ID_KEY, "user-agent"])
# Codes a broken or closed channel produces on its own.
_CHANNEL_CODES = frozenset([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])


def message_size_options(max_message_size=None):
    """grpc options bounding messages by ``max_message_size`` bytes (None: unbounded)."""
    limit = -1 if max_message_size is None else max_message_size
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def _raw_handler(behavior):
    return grpc.stream_stream_rpc_method_handler(behavior)


class _Backend:
    """The channel to one connected client's bridge socket."""

    def __init__(self, info: ClientInfo, options):
        self.info = info
        self.channel = grpc.insecure_channel(f"unix:{info.socket_path}", options=options)
        # Set when the proxy closed the channel because the client left: whatever
        # then fails on it failed because of the tunnel.
        self.closed = False

    def is_ready(self):
        # grpcio has no public synchronous state query on a sync channel.
        try:
            state = self.channel._channel.check_connectivity_state(False)
        except AttributeError:
            return False
        return state == grpc.ChannelConnectivity.READY.value[0]

    def close(self):
        self.closed = True
        self.channel.close()


class TransparentProxy(grpc.GenericRpcHandler):
    """The server's only generic handler: local services first, then forwarding.

    ``local`` maps full method names to handlers always served here (Discovery);
    ``local_unrouted`` maps those served here only when the call names no client
    (health, reflection).
    """

    _log = Logger()

    def __init__(
        self,
        registry,
        authority_domain=None,
        default_client_id=None,
        max_message_size=None,
        local=None,
        local_unrouted=None,
    ):
        self._registry = registry
        self._authority_suffix = (
            "." + authority_domain.strip(".").lower() if authority_domain else None
        )
        self._default_client_id = default_client_id
        self._local = dict(local or {})
        self._local_unrouted = dict(local_unrouted or {})
        # Retries off: the proxy must not buffer or replay requests; the caller decides.
        # The bridge socket is local: when a client's backend or tunnel comes back,
        # reconnect within a second instead of grpc's default backoff of up to 2 min.
        self._channel_options = message_size_options(max_message_size) + [
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._lock = threading.Lock()
        self._backends = {}  # (client_id, socket_path) -> _Backend

    # grpc.GenericRpcHandler

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._local.get(method)
        if handler is not None:
            return handler
        local = self._local_unrouted.get(method)
        if local is not None and not any(
            k == CLIENT_ID_KEY for k, _ in handler_call_details.invocation_metadata
        ):
            return _raw_handler(lambda requests, context: self._local_or_forward(
                local, method, requests, context))
        return _raw_handler(lambda requests, context: self._route_and_forward(
            method, requests, context))

    # channels

    def client_gone(self, info: ClientInfo) -> None:
        """Close the channel to a client that left the registry (any thread)."""
        with self._lock:
            backend = self._backends.pop((info.client_id, info.socket_path), None)
        if backend is not None:
            backend.close()

    def close(self) -> None:
        """Close every channel (the server is stopping)."""
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            backend.close()

    def _backend(self, info: ClientInfo):
        key = (info.client_id, info.socket_path)
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._backends[key] = _Backend(info, self._channel_options)
        # The client may have left between our snapshot read and the insertion, with
        # client_gone() finding nothing to close; the snapshot changes before that call.
        if self._registry.snapshot.get(info.client_id) != info:
            self.client_gone(info)
            return None
        return backend

    # routing

    def _client_id(self, context):
        """The client a call is for, None when it names none; aborts when malformed."""
        values = [v for k, v in context.invocation_metadata() if k == CLIENT_ID_KEY]
        if len(values) > 1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata '{CLIENT_ID_KEY}' must have exactly one value, got {len(values)}",
            )
        if values:
            if not values[0]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"metadata '{CLIENT_ID_KEY}' is empty")
            return values[0]
        if self._authority_suffix is not None:
            client_id = self._id_from_authority(_authority(context))
            if client_id:
                return client_id
        return None

    def _id_from_authority(self, authority):
        if not authority:
            return None
        host = authority
        if not host.endswith("]"):  # not a bare IPv6 literal
            name, sep, port = host.rpartition(":")
            if sep and port.isdigit():
                host = name
        if host.lower().endswith(self._authority_suffix):
            return host[: -len(self._authority_suffix)] or None
        return None

    def _local_or_forward(self, local, method, requests, context):
        client_id = self._client_id(context)
        if client_id is None:
            return _serve_locally(local, requests, context)
        return self._forward(client_id, method, requests, context)

    def _route_and_forward(self, method, requests, context):
        client_id = self._client_id(context) or self._default_client_id
        if client_id is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no target client: set the metadata '{CLIENT_ID_KEY}' to a client id",
            )
        return self._forward(client_id, method, requests, context)

    # forwarding

    def _forward(self, client_id, method, requests, context):
        info = self._registry.snapshot.get(client_id)
        backend = self._backend(info) if info is not None else None
        if backend is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"client '{client_id}' is not connected")
        metadata = [
            (k, v) for k, v in context.invocation_metadata()
            if k not in _STRIPPED_KEYS and not k.startswith(("grpc-", ":"))
        ]
        call = backend.channel.stream_stream(method)(
            requests, timeout=_time_remaining(context), metadata=metadata
        )
        # Fires on every end of the caller's call, cancellation included.
        context.add_callback(call.cancel)
        return self._relay(backend, call, context)

    def _relay(self, backend, call, context):
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
        details = call.details()
        if self._failed_in_channel(backend, call, code, trailers):
            client_id = backend.info.client_id
            self._log.info("call to client {client_id} failed in transit: {code} {details}",
                           client_id=client_id, code=code, details=details)
            code = grpc.StatusCode.UNAVAILABLE
            details = f"client '{client_id}' is unavailable: {details}"
        context.set_code(code)
        context.set_details(details)

    @staticmethod
    def _failed_in_channel(backend, call, code, trailers):
        """Whether the status came from the channel rather than the client's server.

        grpcio does not say where a status came from. A server's answer arrives on a
        working connection and usually with metadata; a broken tunnel leaves the
        channel not READY, and a channel we closed means the client left.
        """
        if backend.closed:
            return True
        if code not in _CHANNEL_CODES or call.initial_metadata() or trailers:
            return False
        return not backend.is_ready()


def _authority(context):
    """The call's ``:authority``. grpcio exposes it only on this private path."""
    try:
        host = context._rpc_event.call_details.host
    except AttributeError:
        return None
    return host.decode("ascii", "replace") if isinstance(host, bytes) else host


def _time_remaining(context):
    remaining = context.time_remaining()
    # Without a deadline grpcio reports roughly the largest int64 in seconds.
    return remaining if remaining < 1e9 else None


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
