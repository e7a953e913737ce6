"""The router: each caller stream becomes a stream on an upstream connection.

Per new caller stream the header block is checked (RFC 9113 section 8), the call is
routed (``client-id`` metadata, else ``:authority`` ``<id>.<domain>``, else the
default client, else the local services for Discovery, health and reflection),
authorised (proxy tokens) and admitted (call limits); its headers, without any
copy of ``client-id`` or ``grpcmux-token``, go to the upstream, and from then on
DATA, trailers and RST_STREAM pass both ways with the stream ids rewritten.
Refusals are gRPC statuses, trailers-only.

Flow control is per call: a caller's DATA is credited back to it only once it was
written to the upstream within the upstream's windows, and the other way round,
so a slow caller holds back only its own call.
"""

import hmac
import time

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from grpcmux.tokens import PROXY_TOKEN_METADATA_KEY
from grpcmux.tuning import tune_transport

from .connection import H2Connection
from .frames import ERROR_CANCEL, ERROR_NO_ERROR, ERROR_PROTOCOL_ERROR, ERROR_REFUSED_STREAM
from .grpc_messages import MessageLimit, MessageTooLarge
from .headers import HeaderError, check_response, check_trailers, parse_request
from .status import (
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    CallRefused,
    code_name,
    trailers,
    trailers_only,
)
from .upstream import UpstreamPool

CLIENT_ID_KEY = b"client-id"
TOKEN_KEY = PROXY_TOKEN_METADATA_KEY.encode("ascii")
#: What one node of a cluster presents to another's cluster listener on every call.
NODE_TOKEN_KEY = b"grpcmux-node-token"
#: Every forwarded request carries this router's pseudonym in ``via`` (RFC 9110
#: section 7.6.3, as HTTP proxies do): a request that comes back to the same router
#: (a client whose gRPC server is this proxy) is refused instead of looping.
VIA_KEY = b"via"
MAX_HOPS = 8
UNAUTHENTICATED_DETAILS = (
    f"a valid proxy token is required in the metadata '{PROXY_TOKEN_METADATA_KEY}'")

DISCOVERY_PREFIX = b"/grpc.multiplexer.v1.DiscoveryService/"
#: Answered by the proxy itself when the call names no client.
UNROUTED_LOCAL_PREFIXES = (
    b"/grpc.health.v1.Health/",
    b"/grpc.reflection.v1alpha.ServerReflection/",
    b"/grpc.reflection.v1.ServerReflection/",
)
# RST_STREAM codes as the status a gRPC client makes of them, for metrics.
_RESET_STATUS = {ERROR_NO_ERROR: "OK", ERROR_CANCEL: "CANCELLED",
                 ERROR_REFUSED_STREAM: "UNAVAILABLE"}


def _header_list_size(headers):
    return sum(len(name) + len(value) + 32 for name, value in headers)


class Call:
    """One proxied stream: the caller's half and, once opened, the upstream's."""

    __slots__ = (
        "_router", "caller", "upstream", "_pool", "_headers", "_queued", "_request_ended",
        "response_started", "done", "_started", "label", "bytes_in", "bytes_out",
        "_request_limit", "_response_limit", "__weakref__",
    )

    def __init__(self, router, caller, headers, pool, label, max_message_size):
        self._router = router
        self.caller = caller
        self.upstream = None
        self._pool = pool
        self._headers = headers
        self._queued = []
        self._request_ended = caller.remote_closed
        self.response_started = False
        self.done = False
        self._started = time.monotonic()
        self.label = label
        self.bytes_in = 0
        self.bytes_out = 0
        if max_message_size is None:
            self._request_limit = self._response_limit = None
        else:
            self._request_limit = MessageLimit(max_message_size)
            self._response_limit = MessageLimit(max_message_size)

    # -- the upstream pool's answers -------------------------------------------

    def upstream_opened(self, connection):
        if self.done:
            return
        stream = self.upstream = connection.open_stream(self)
        queued, self._queued = self._queued, None
        connection.send_headers(stream, self._headers, self._request_ended and not queued)
        self._headers = None
        for data, end in queued:
            if end is None:  # request trailers
                connection.send_headers(stream, data, True)
            else:
                connection.send_data(stream, data, end)

    def upstream_failed(self, code, message):
        self.fail(code, message)

    # -- stream handler ---------------------------------------------------------

    def stream_headers(self, stream, headers, end_stream):
        if stream is self.caller:
            self._request_trailers(headers, end_stream)
        else:
            self._response_headers(headers, end_stream)

    def _request_trailers(self, headers, end_stream):
        try:
            if not end_stream:
                raise HeaderError("HEADERS after DATA without END_STREAM")
            check_trailers(headers)
        except HeaderError:
            self._protocol_error()
            return
        self._request_ended = True
        if self.upstream is not None:
            self.upstream.connection.send_headers(self.upstream, headers, True)
        elif self._queued is not None:
            self._queued.append((headers, None))

    def _response_headers(self, headers, end_stream):
        first = not self.response_started
        try:
            if first:
                status = check_response(headers)
                if status[:1] == b"1":
                    self.caller.connection.send_headers(self.caller, headers, False)
                    return
            else:
                if not end_stream:
                    raise HeaderError("response trailers without END_STREAM")
                check_trailers(headers)
        except HeaderError as error:
            self._malformed_response(error)
            return
        self.response_started = True
        self.caller.connection.send_headers(self.caller, headers, end_stream)
        if end_stream:
            code = next((v for n, v in headers if n == b"grpc-status"), None)
            self._finished(code_name(code) if code is not None else "UNKNOWN")

    def stream_data(self, stream, data, end_stream):
        if stream is self.caller:
            self.bytes_in += len(data)
            if self._request_limit is not None and data:
                try:
                    self._request_limit.feed(data)
                except MessageTooLarge as error:
                    self.fail(RESOURCE_EXHAUSTED, f"request {error}")
                    return
            if end_stream:
                self._request_ended = True
            if self.upstream is not None:
                self.upstream.connection.send_data(self.upstream, data, end_stream)
            elif self._queued is not None:
                self._queued.append((data, end_stream))
        else:
            if not self.response_started:
                self._malformed_response(HeaderError("response DATA before its HEADERS"))
                return
            self.bytes_out += len(data)
            if self._response_limit is not None and data:
                try:
                    self._response_limit.feed(data)
                except MessageTooLarge as error:
                    self.fail(RESOURCE_EXHAUSTED, f"response {error}")
                    return
            self.caller.connection.send_data(self.caller, data, end_stream)
            if end_stream:
                self._finished("UNKNOWN")  # a response without trailers

    def _malformed_response(self, error):
        self._router.upstream_misbehaved(self, error)
        self.fail(UNAVAILABLE, f"{self._router.describe(self)} sent a malformed response")

    def stream_drained(self, stream, count):
        if stream is self.upstream:
            self.caller.connection.credit(self.caller, count)
        elif self.upstream is not None:
            self.upstream.connection.credit(self.upstream, count)

    def stream_reset(self, stream, code):
        if self.done:
            return
        if stream is self.caller:
            # The caller cancelled, reset, or its connection ended.
            if self.upstream is not None:
                self.upstream.connection.reset_stream(self.upstream, ERROR_CANCEL)
            else:
                self._pool.cancel(self)
            self._finished("CANCELLED")
            return
        if code is None:  # the upstream connection ended under the call
            status, message = self._pool.target.failure(stream.connection, None)
            self.fail(status, message)
            return
        self.caller.connection.reset_stream(self.caller, code)
        self._finished(_RESET_STATUS.get(code, "INTERNAL"))

    # -- ending -----------------------------------------------------------------

    def fail(self, code, message):
        """Answer the caller with a status of our own and drop the upstream stream."""
        if self.done:
            return
        caller = self.caller
        if self.response_started:
            caller.connection.send_headers(caller, trailers(code, message), True)
        else:
            caller.connection.send_headers(caller, trailers_only(code, message), True)
        if self.upstream is not None:
            self.upstream.connection.reset_stream(self.upstream, ERROR_CANCEL)
        else:
            self._pool.cancel(self)
        self._finished(code_name(code))

    def _protocol_error(self):
        self.caller.connection.peer_caused_reset()
        self.caller.connection.reset_stream(self.caller, ERROR_PROTOCOL_ERROR)
        if self.upstream is not None:
            self.upstream.connection.reset_stream(self.upstream, ERROR_CANCEL)
        else:
            self._pool.cancel(self)
        self._finished("INTERNAL")

    def _finished(self, code):
        if self.done:
            return
        self.done = True
        self._queued = None
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            # The response is complete: the upstream need not wait for more request.
            upstream.connection.reset_stream(upstream, ERROR_NO_ERROR)
        self._router.call_finished(self, code, time.monotonic() - self._started)


class RouterLimits:
    """What the router admits (see docs/limits.rst): calls in progress in all and
    to one client, and the largest message (None: unbounded)."""

    __slots__ = ("max_calls", "max_calls_per_client", "max_message_size")

    def __init__(self, max_calls, max_calls_per_client, max_message_size):
        self.max_calls = max_calls
        self.max_calls_per_client = max_calls_per_client
        self.max_message_size = max_message_size

    @classmethod
    def from_settings(cls, settings):
        """The limits the server settings give (``max_proxy_calls``,
        ``max_calls_per_client``, ``max_message_size``)."""
        return cls(settings.max_proxy_calls, settings.max_calls_per_client,
                   settings.max_message_size)


class _CallerFactory(Factory):
    noisy = False

    def __init__(self, router):
        self._router = router

    def buildProtocol(self, addr):
        return self._router.caller_connection()


class Router:
    """Routes the streams of caller connections to upstream pools.

    ``registry`` is read for who is connected; ``tunnels(client_id)`` returns the
    upstream target of a client connected here (or None); ``remote(info)``, in a
    cluster, the target of the node that holds a client connected elsewhere; ``local``
    is the target of the local grpcio services; ``limits`` (:class:`RouterLimits`)
    bound the calls and messages admitted. ``observer``, if given, is told of
    every call that ends: ``observer(label, code_name, seconds, bytes_in, bytes_out)``.

    With ``node_token`` the router serves a cluster listener: every call must carry
    that token in ``grpcmux-node-token`` (the caller's own token was checked on the
    node it entered), routes by ``client-id`` to clients connected here only, and
    answers nothing itself.
    """

    _log = Logger()

    def __init__(self, clock, registry, tunnels, local, caller_config, upstream_config,
                 limits, tokens=None, authority_domain=None, default_client_id=None,
                 budget=None, observer=None, instance=b"proxy", remote=None,
                 node_token=None):
        self._clock = clock
        self._registry = registry
        self._tunnels = tunnels
        self._caller_config = caller_config
        self._upstream_config = upstream_config
        self._limits = limits
        self._tokens = tokens
        self._authority_suffix = (
            ("." + authority_domain.strip(".").lower()).encode("ascii")
            if authority_domain else None)
        self._default_client_id = default_client_id
        self._budget = budget
        self._observer = observer
        self._remote = remote
        self._node_token = node_token
        self._via = b"2 grpcmux-" + instance
        self._local_pool = (UpstreamPool(local, upstream_config, clock, budget)
                            if local is not None else None)
        self._pools = {}  # client id (or node label) -> pool of its current target
        self.callers = set()
        self.calls = set()
        self._per_client = {}
        self.factory = _CallerFactory(self)
        self.stopping = False

    # -- caller connections ----------------------------------------------------

    def caller_connection(self):
        connection = H2Connection(self._caller_config, self._clock, is_client=False,
                                  on_new_stream=self._new_stream, budget=self._budget,
                                  announce_proxy=True)
        self.callers.add(connection)
        connection.on_made = self._caller_made
        connection.on_closed = lambda reason: self.callers.discard(connection)
        if self.stopping:
            self._clock.callLater(0, connection.drain)
        return connection

    @staticmethod
    def _caller_made(connection):
        tune_transport(connection.transport)

    def _new_stream(self, connection, stream, headers, end_stream):
        try:
            request = parse_request(headers)
        except HeaderError as error:
            self._log.debug("malformed request from {peer}: {error}",
                            peer=connection.transport.getPeer(), error=error)
            connection.reset_stream(stream, ERROR_PROTOCOL_ERROR)
            self._count("", "INTERNAL", 0.0)
            return None
        try:
            size, limit = _header_list_size(headers), self._caller_config.max_header_list_size
            if size > limit:
                raise CallRefused(RESOURCE_EXHAUSTED, f"request metadata of {size} bytes is "
                                  f"larger than the limit of {limit}")
            pool, label, forwarded = self._route(request)
        except CallRefused as refusal:
            connection.send_headers(stream, trailers_only(refusal.code, refusal.message), True)
            self._count(getattr(refusal, "label", ""), code_name(refusal.code), 0.0)
            return None
        call = Call(self, stream, forwarded, pool, label, self._limits.max_message_size)
        stream.handler = call
        self.calls.add(call)
        if label:
            self._per_client[label] = self._per_client.get(label, 0) + 1
        pool.request(call)
        return call

    def _route(self, request):
        """(pool, label, headers to forward) for a request; CallRefused if none."""
        path = request.path
        hops = [hop.strip() for value in request.values(VIA_KEY) for hop in value.split(b",")]
        if self._via in hops or len(hops) >= MAX_HOPS:
            raise CallRefused(FAILED_PRECONDITION,
                              "call loop: this call already passed through this grpcmux "
                              "proxy (is a client's --grpc-server-address this proxy?)")
        if len(self.calls) >= self._limits.max_calls:
            raise CallRefused(RESOURCE_EXHAUSTED,
                              f"the proxy has {self._limits.max_calls} calls in progress, "
                              "the most allowed; retry later")
        if self._node_token is not None:
            return self._route_from_node(request)
        try:
            named = self._named_client(request)
        except CallRefused:
            self._token_patterns(request)  # without a valid token: UNAUTHENTICATED first
            raise
        if path.startswith(DISCOVERY_PREFIX) or (
                named is None and path.startswith(UNROUTED_LOCAL_PREFIXES)):
            return self._local_pool, "", self._forwarded(request, keep_token=True)
        patterns = self._token_patterns(request)
        client_id = named or self._default_client_id
        if client_id is None:
            raise CallRefused(INVALID_ARGUMENT,
                              f"no target client: set the metadata '{CLIENT_ID_KEY.decode()}' "
                              "to a client id")
        if patterns is not None and not self._tokens.allows(patterns, client_id):
            raise CallRefused(PERMISSION_DENIED,
                              f"this proxy token may not call client '{client_id}'")
        info = self._registry.get(client_id)
        target = self._tunnels(client_id) if info is not None else None
        if target is None and info is not None and self._remote is not None:
            target = self._remote(info)
            if target is not None:
                self._admit(client_id)
                return (self._pool_for(("node", target.name), target), client_id,
                        self._forwarded(request, node=target))
        if target is None:
            raise CallRefused(NOT_FOUND, f"client '{client_id}' is not connected")
        if getattr(info, "health", None) == "not_serving":
            raise CallRefused(UNAVAILABLE, f"client '{client_id}' reports its gRPC server down")
        self._admit(client_id)
        return self._pool_for(client_id, target), client_id, self._forwarded(request)

    def _admit(self, client_id):
        limit = self._limits.max_calls_per_client
        if limit is not None and self._per_client.get(client_id, 0) >= limit:
            refusal = CallRefused(
                RESOURCE_EXHAUSTED,
                f"client '{client_id}' already has {limit} calls in progress, the most "
                "allowed; retry later")
            refusal.label = client_id
            raise refusal

    def _route_from_node(self, request):
        """A call another node forwarded: its token, then a client connected here."""
        tokens = request.values(NODE_TOKEN_KEY)
        if len(tokens) != 1 or not hmac.compare_digest(tokens[0], self._node_token):
            raise CallRefused(UNAUTHENTICATED, "this is a cluster listener: calls need "
                                               "the cluster's node token")
        values = request.values(CLIENT_ID_KEY)
        client_id = values[0].decode("utf-8", "replace") if len(values) == 1 else None
        target = self._tunnels(client_id) if client_id else None
        if target is None:
            raise CallRefused(NOT_FOUND, f"client '{client_id}' is not connected to this node")
        self._admit(client_id)
        return self._pool_for(client_id, target), client_id, self._forwarded(request)

    def _named_client(self, request):
        values = request.values(CLIENT_ID_KEY)
        if len(values) > 1:
            raise CallRefused(INVALID_ARGUMENT,
                              f"metadata 'client-id' must have exactly one value, got {len(values)}")
        if values:
            if not values[0]:
                raise CallRefused(INVALID_ARGUMENT, "metadata 'client-id' is empty")
            return values[0].decode("utf-8", "replace")
        if self._authority_suffix is not None and request.authority:
            return self._id_from_authority(request.authority)
        return None

    def _named_or_default(self, request):
        named = self._named_client(request) or self._default_client_id
        return named.encode("utf-8")

    def _id_from_authority(self, authority):
        host = authority
        if not host.endswith(b"]"):  # not a bare IPv6 literal
            name, sep, port = host.rpartition(b":")
            if sep and port.isdigit():
                host = name
        if host.lower().endswith(self._authority_suffix):
            return host[: -len(self._authority_suffix)].decode("utf-8", "replace") or None
        return None

    def _token_patterns(self, request):
        if self._tokens is None:
            return None
        metadata = [(TOKEN_KEY.decode(), v.decode("utf-8", "replace"))
                    for v in request.values(TOKEN_KEY)]
        patterns = self._tokens.patterns_in(metadata)
        if patterns is None:
            raise CallRefused(UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        return patterns

    def _forwarded(self, request, keep_token=False, node=None):
        """The request's headers for the upstream: ``client-id``, ``grpcmux-token`` and
        ``grpcmux-node-token`` removed (``client-id`` kept for a ``node``, which routes
        by it, with the node's own headers added), ``via`` extended."""
        headers = [(b":method", request.method), (b":scheme", request.scheme),
                   (b":path", request.path)]
        if request.authority is not None:
            headers.append((b":authority", request.authority))
        if node is not None:
            headers.append((CLIENT_ID_KEY, self._named_or_default(request)))
            headers.extend(node.headers)
        via = []
        for field in request.fields:
            name = field[0]
            if (name == CLIENT_ID_KEY or name == b"host" or name == NODE_TOKEN_KEY
                    or (name == TOKEN_KEY and not keep_token)):
                continue
            if name == VIA_KEY:
                via.append(field[1])
                continue
            headers.append(field)
        via.append(self._via)
        headers.append((VIA_KEY, b", ".join(via)))
        return headers

    def _pool_for(self, client_id, target):
        pool = self._pools.get(client_id)
        if pool is None or pool.target is not target:
            if pool is not None:
                pool.close()
            pool = self._pools[client_id] = UpstreamPool(
                target, self._upstream_config, self._clock, self._budget)
        return pool

    # -- clients coming and going ----------------------------------------------

    def client_left(self, client_id, graceful):
        """A client left the registry: drain (graceful) or drop its pool."""
        pool = self._pools.pop(client_id, None)
        if pool is None:
            return
        if graceful:
            pool.retire()
        else:
            pool.close(abort=True)

    # -- bookkeeping ------------------------------------------------------------

    def describe(self, call):
        return f"client '{call.label}'" if call.label else "the proxy's own services"

    def upstream_misbehaved(self, call, error):
        self._log.warn("{upstream} sent a malformed response: {error}",
                       upstream=self.describe(call), error=error)

    def call_finished(self, call, code, seconds):
        self.calls.discard(call)
        label = call.label
        if label:
            left = self._per_client.get(label, 1) - 1
            if left:
                self._per_client[label] = left
            else:
                self._per_client.pop(label, None)
        self._count(label, code, seconds, call.bytes_in, call.bytes_out)

    def _count(self, label, code, seconds, bytes_in=0, bytes_out=0):
        if self._observer is not None:
            self._observer(label, code, seconds, bytes_in, bytes_out)

    def calls_to(self, client_id):
        return self._per_client.get(client_id, 0)

    def upstream_clients(self):
        """The ids of the clients the router has upstream pools for."""
        return {key for key in self._pools if isinstance(key, str)}

    def upstream_connections(self):
        pools = [p for p in (self._local_pool, *tuple(self._pools.values())) if p is not None]
        return sum(len(pool.connections) for pool in pools)

    # -- stopping ------------------------------------------------------------------

    def drain(self):
        """GOAWAY to every caller: no new calls; connections close as their calls end."""
        self.stopping = True
        for connection in list(self.callers):
            connection.drain()

    def cancel_all(self, message="the proxy is shutting down"):
        """Fail every call still running and close every connection."""
        for call in list(self.calls):
            call.fail(UNAVAILABLE, message)
        for connection in list(self.callers):
            connection.close(ERROR_NO_ERROR, "shutting down")
        for pool in [self._local_pool, *self._pools.values()]:
            if pool is not None:
                pool.close()
        self._pools.clear()
