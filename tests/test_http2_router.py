"""The router (grpcmux.http2.router, upstream): routing, validation, limits, flow, upstreams.

Raw frames in and out on StringTransports (tests/h2_harness.py): the test plays the
callers and the upstream gRPC servers; one rule per test.
"""

import pytest
from hpack import NeverIndexedHeaderTuple
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionLost

import h2_frames as h2
from grpcmux.config import ServerSettings
from grpcmux.http2.config import H2Config
from grpcmux.http2.connection import Budget
from grpcmux.http2.frames import (
    ERROR_CANCEL,
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_FLOW_CONTROL_ERROR,
    ERROR_INTERNAL_ERROR,
    ERROR_NO_ERROR,
    ERROR_PROTOCOL_ERROR,
    ERROR_REFUSED_STREAM,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_RST_STREAM,
    TYPE_WINDOW_UPDATE,
)
from grpcmux.http2.router import RouterLimits
from grpcmux.tokens import ProxyTokens, hash_token
from h2_harness import OK_TRAILERS, RESPONSE, RouterHarness, request

DISCOVERY = b"/grpc.multiplexer.v1.DiscoveryService/List"
HEALTH = b"/grpc.health.v1.Health/Check"


def only(frames, frame_type, stream_id=None):
    return [f for f in frames if f.type == frame_type
            and (stream_id is None or f.stream_id == stream_id)]


def status_of(caller, stream_id):
    """(grpc-status, grpc-message, trailers-only?) of the caller's stream."""
    caller.frames()
    blocks = [f for f in caller.received
              if f.type == TYPE_HEADERS and f.stream_id == stream_id]
    last = blocks[-1]
    assert last.end_stream, blocks
    code = int(last.header(b"grpc-status")[0])
    message = b"".join(last.header(b"grpc-message")).decode()
    return code, message, len(blocks) == 1 and last.header(b":status") == [b"200"]


def refused(caller, stream_id, code):
    got, message, trailers_only = status_of(caller, stream_id)
    assert (got, trailers_only) == (code, True), message
    return message


def forwarded(upstream, stream_id=None):
    """The header blocks the router sent upstream."""
    return upstream.headers_frames(stream_id)


@pytest.fixture
def h():
    harness = RouterHarness()
    harness.client("alpha")
    return harness


# -- routing ---------------------------------------------------------------------


def test_client_id_routes_and_is_stripped(h):
    caller = h.caller()
    caller.call(1, extra=[(b"x-keep", b"1")])
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    names = [n for n, _ in sent.headers]
    assert b"client-id" not in names
    assert sent.header(b"x-keep") == [b"1"]
    assert sent.header(b":path") == [b"/test.Echo/Unary"]


def test_forwarded_request_carries_via_with_our_pseudonym(h):
    caller = h.caller()
    caller.call(1, extra=[(b"via", b"1.1 edge")])
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    assert sent.header(b"via") == [b"1.1 edge, 2 grpcmux-testproxy"]


def test_call_loop_through_this_proxy_is_refused(h):
    caller = h.caller()
    caller.call(1, extra=[(b"via", b"2 grpcmux-testproxy")])
    assert "call loop" in refused(caller, 1, 9)
    assert not h.tunnels["alpha"].upstreams


def test_too_many_hops_are_refused(h):
    caller = h.caller()
    caller.call(1, extra=[(b"via", b", ".join(b"2 p%d" % i for i in range(8)))])
    refused(caller, 1, 9)


def test_authority_label_routes_with_authority_domain():
    h = RouterHarness(authority_domain="mux.test")
    h.client("alpha")
    caller = h.caller()
    caller.call(1, client_id=None, authority=b"alpha.Mux.Test:8443")  # the domain in any case
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    assert sent.header(b":authority") == [b"alpha.Mux.Test:8443"]


def test_authority_is_not_a_route_without_authority_domain(h):
    caller = h.caller()
    caller.call(1, client_id=None, authority=b"alpha.mux.test")
    refused(caller, 1, 3)


def test_authority_outside_the_domain_is_no_route():
    h = RouterHarness(authority_domain="mux.test")
    h.client("alpha")
    caller = h.caller()
    caller.call(1, client_id=None, authority=b"alpha.other.test")
    refused(caller, 1, 3)


def test_client_id_wins_over_authority():
    h = RouterHarness(authority_domain="mux.test")
    h.client("alpha")
    h.client("beta")
    caller = h.caller()
    caller.call(1, client_id="beta", authority=b"alpha.mux.test")
    assert forwarded(h.tunnels["beta"].upstream, 1)
    assert not h.tunnels["alpha"].upstreams


def test_default_client_takes_calls_without_a_key():
    h = RouterHarness(default_client_id="alpha")
    h.client("alpha")
    caller = h.caller()
    caller.call(1, client_id=None)
    assert forwarded(h.tunnels["alpha"].upstream, 1)


def test_discovery_is_always_local(h):
    caller = h.caller()
    caller.call(1, path=DISCOVERY, extra=[(b"x-keep", b"1")])
    (sent,) = forwarded(h.local.upstream, 1)
    assert sent.header(b"client-id") == [] and sent.header(b"x-keep") == [b"1"]
    assert not h.tunnels["alpha"].upstreams


@pytest.mark.parametrize("path", [
    HEALTH,
    b"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
])
def test_health_and_reflection_without_a_key_are_local(h, path):
    caller = h.caller()
    caller.call(1, client_id=None, path=path)
    assert forwarded(h.local.upstream, 1)


def test_health_with_a_key_goes_to_the_client(h):
    caller = h.caller()
    caller.call(1, path=HEALTH)
    assert forwarded(h.tunnels["alpha"].upstream, 1)
    assert not h.local.upstreams


def test_unknown_client_is_not_found(h):
    caller = h.caller()
    caller.call(1, client_id="nobody")
    assert "nobody" in refused(caller, 1, 5)


def test_registered_client_without_a_tunnel_is_not_found(h):
    del h.tunnels["alpha"]
    caller = h.caller()
    caller.call(1)
    refused(caller, 1, 5)


def test_no_key_is_invalid_argument(h):
    caller = h.caller()
    caller.call(1, client_id=None)
    assert "client-id" in refused(caller, 1, 3)


def test_two_client_id_values_are_invalid_argument(h):
    caller = h.caller()
    caller.call(1, extra=[(b"client-id", b"alpha")])
    assert "exactly one" in refused(caller, 1, 3)
    assert not h.tunnels["alpha"].upstreams


def test_empty_client_id_is_invalid_argument(h):
    caller = h.caller()
    caller.call(1, client_id="")
    assert "empty" in refused(caller, 1, 3)


def test_refusal_is_trailers_only_and_the_connection_stays(h):
    caller = h.caller()
    caller.call(1, client_id="nobody", end_stream=True)
    caller.call(3)
    refused(caller, 1, 5)
    assert forwarded(h.tunnels["alpha"].upstream)
    assert h.ended[0] == ("", "NOT_FOUND", 0, 0)


# -- proxy tokens -------------------------------------------------------------------


@pytest.fixture
def guarded():
    tokens = ProxyTokens([(hash_token("lab").encode(), ("lab-*",)),
                          (hash_token("all").encode(), ("*",))])
    harness = RouterHarness(tokens=tokens)
    harness.client("lab-1")
    harness.client("prod")
    return harness


def token(value):
    return [(b"grpcmux-token", value)]


def test_call_without_a_token_is_unauthenticated(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="lab-1")
    assert "grpcmux-token" in refused(caller, 1, 16)


def test_unknown_token_is_unauthenticated(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="lab-1", extra=token(b"guess"))
    refused(caller, 1, 16)


def test_two_tokens_are_unauthenticated(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="lab-1", extra=token(b"lab") + token(b"all"))
    refused(caller, 1, 16)


def test_token_for_other_clients_is_permission_denied(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="prod", extra=token(b"lab"))
    assert "prod" in refused(caller, 1, 7)
    assert not guarded.tunnels["prod"].upstreams


def test_valid_token_is_forwarded_stripped(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="lab-1", extra=token(b"lab"))
    (sent,) = forwarded(guarded.tunnels["lab-1"].upstream, 1)
    assert sent.header(b"grpcmux-token") == []


@pytest.mark.parametrize("client_id", [[(b"client-id", b"lab-1")] * 2, [(b"client-id", b"")]])
def test_bad_client_id_without_a_token_is_unauthenticated(guarded, client_id):
    caller = guarded.caller()
    caller.call(1, client_id=None, extra=client_id)
    refused(caller, 1, 16)  # before anything else, as docs/security.rst says


def test_token_is_checked_before_the_client_is_looked_up(guarded):
    caller = guarded.caller()
    caller.call(1, client_id="nobody")
    refused(caller, 1, 16)  # no hint about which ids exist


def test_discovery_keeps_the_token_for_the_local_services(guarded):
    caller = guarded.caller()
    caller.call(1, path=DISCOVERY, client_id=None, extra=token(b"lab"))
    (sent,) = forwarded(guarded.local.upstream, 1)
    assert sent.header(b"grpcmux-token") == [b"lab"]


# -- request validation (RFC 9113 section 8.2, 8.3) ----------------------------------


def _with(fields, index, field):
    fields = list(fields)
    fields.insert(index, field)
    return fields


BASE = request()

MALFORMED = {
    "uppercase name": BASE + [(b"X-Upper", b"1")],
    "space in name": BASE + [(b"x bad", b"1")],
    "empty name": BASE + [(b"", b"1")],
    "connection": BASE + [(b"connection", b"close")],
    "keep-alive": BASE + [(b"keep-alive", b"5")],
    "proxy-connection": BASE + [(b"proxy-connection", b"close")],
    "transfer-encoding": BASE + [(b"transfer-encoding", b"chunked")],
    "upgrade": BASE + [(b"upgrade", b"h2c")],
    "te other than trailers": [f for f in BASE if f[0] != b"te"] + [(b"te", b"gzip")],
    "CR in a value": BASE + [(b"x-v", b"a\rb")],
    "LF in a value": BASE + [(b"x-v", b"a\nb")],
    "NUL in a value": BASE + [(b"x-v", b"a\0b")],
    "leading space": BASE + [(b"x-v", b" a")],
    "trailing tab": BASE + [(b"x-v", b"a\t")],
    "CR in a pseudo-header": _with(BASE[1:], 0, (b":method", b"PO\rST")),
    "pseudo after regular": BASE + [(b":authority", b"x")],
    "unknown pseudo": _with(BASE, 0, (b":protocol", b"websocket")),
    "response pseudo in a request": _with(BASE, 0, (b":status", b"200")),
    "duplicate pseudo": _with(BASE, 0, (b":path", b"/other")),
    "missing :method": [f for f in BASE if f[0] != b":method"],
    "missing :scheme": [f for f in BASE if f[0] != b":scheme"],
    "missing :path": [f for f in BASE if f[0] != b":path"],
    "empty :path": [(n, b"" if n == b":path" else v) for n, v in BASE],
    ":path without a slash": [(n, b"Echo/Unary" if n == b":path" else v) for n, v in BASE],
    "CONNECT": [(n, b"CONNECT" if n == b":method" else v) for n, v in BASE],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_reset_and_never_forwarded(h, name):
    caller = h.caller()
    caller.call(1, MALFORMED[name])
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_PROTOCOL_ERROR
    assert not caller.disconnecting
    assert not h.tunnels["alpha"].upstreams
    caller.call(3)  # the connection goes on
    assert forwarded(h.tunnels["alpha"].upstream, 1)


def test_options_star_path_is_well_formed(h):
    caller = h.caller()
    caller.call(1, [(n, {b":method": b"OPTIONS", b":path": b"*"}.get(n, v)) for n, v in BASE])
    assert forwarded(h.tunnels["alpha"].upstream, 1)


def test_header_block_larger_than_a_frame_goes_upstream_in_continuations(h):
    caller = h.caller()
    caller.headers(1, request(extra=[(b"x-big", b"v" * 40000)]), split=16000)
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    assert sent.continuations == 2 and sent.header(b"x-big") == [b"v" * 40000]


def test_te_trailers_is_forwarded(h):
    caller = h.caller()
    caller.call(1)
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    assert sent.header(b"te") == [b"trailers"]


def test_host_without_authority_becomes_authority(h):
    caller = h.caller()
    caller.call(1, request(authority=None, extra=[(b"host", b"h.test")]))
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    assert sent.header(b":authority") == [b"h.test"] and sent.header(b"host") == []


def test_malformed_request_trailers_reset_the_call(h):
    caller = h.caller()
    caller.call(1)
    caller.headers(1, [(b":path", b"/x")], end_stream=True)
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_PROTOCOL_ERROR
    assert only(h.tunnels["alpha"].upstream.frames(), TYPE_RST_STREAM, 1)


def test_request_trailers_are_forwarded(h):
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, h2.grpc_message(b"m")))
    caller.headers(1, [(b"x-end", b"1")], end_stream=True)
    blocks = forwarded(h.tunnels["alpha"].upstream, 1)
    assert blocks[-1].end_stream and blocks[-1].header(b"x-end") == [b"1"]


def test_request_trailers_wait_with_the_call_for_the_upstream():
    h = RouterHarness()
    tunnel = h.client("alpha", hold=True)
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, h2.grpc_message(b"m")))
    caller.headers(1, [(b"x-end", b"1")], end_stream=True)
    tunnel.release()
    blocks = forwarded(tunnel.upstream, 1)
    assert len(blocks) == 2 and blocks[-1].header(b"x-end") == [b"1"]
    assert blocks[-1].end_stream


def test_malformed_response_fails_the_call_as_unavailable(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, [(b":status", b"200"), (b"Bad", b"1")])
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (14, True) and "alpha" in message
    assert only(upstream.frames(), TYPE_RST_STREAM, 1)


def test_response_data_before_its_headers_is_a_malformed_response(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.send(h2.data(1, h2.grpc_message(b"early")))
    assert not only(caller.frames(), TYPE_DATA)
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (14, True) and "malformed" in message


def test_response_trailers_without_end_stream_are_a_malformed_response(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.headers(1, [(b"x-more", b"1")])
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (14, False) and "malformed" in message
    assert only(upstream.frames(), TYPE_RST_STREAM, 1)


def test_frames_on_a_stream_we_reset_are_ignored(h):
    # RFC 9113 section 5.1: frames the peer sent before it saw our RST_STREAM.
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    caller.send(h2.rst_stream(1, ERROR_CANCEL))
    upstream.frames()
    caller.frames()
    upstream.send(h2.data(1, b"in flight") * 100)
    assert upstream.frames() == []
    assert not upstream.disconnecting and not caller.frames()


def test_informational_response_is_passed_before_the_response(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, [(b":status", b"103"), (b"link", b"</x>")])
    upstream.respond(1, b"r")
    blocks = [f for f in caller.frames() if f.type == TYPE_HEADERS]
    assert [b.header(b":status") for b in blocks] == [[b"103"], [b"200"], []]


# -- never-indexed fields (RFC 7541 section 7.1.3) -------------------------------------


def test_never_indexed_request_field_stays_never_indexed(h):
    caller = h.caller()
    caller.call(1, extra=[NeverIndexedHeaderTuple(b"authorization", b"Bearer s"),
                          (b"x-plain", b"1")])
    (sent,) = forwarded(h.tunnels["alpha"].upstream, 1)
    kinds = {n: type(f) for f in sent.headers for n in [f[0]]}
    assert kinds[b"authorization"] is NeverIndexedHeaderTuple
    assert kinds[b"x-plain"] is not NeverIndexedHeaderTuple


def test_never_indexed_field_stays_never_indexed_when_the_block_repeats(h):
    caller = h.caller()
    secret = [NeverIndexedHeaderTuple(b"authorization", b"Bearer s")]
    for stream_id in (1, 3, 5):
        caller.call(stream_id, extra=secret)
    blocks = forwarded(h.tunnels["alpha"].upstream)
    assert len(blocks) == 3
    for block in blocks:
        (field,) = [f for f in block.headers if f[0] == b"authorization"]
        assert type(field) is NeverIndexedHeaderTuple


def test_never_indexed_response_field_stays_never_indexed(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE + [NeverIndexedHeaderTuple(b"x-secret", b"s")])
    upstream.headers(1, [NeverIndexedHeaderTuple(b"x-trailer", b"t"), (b"grpc-status", b"0")],
                     end_stream=True)
    response, trailers = [f for f in caller.frames() if f.type == TYPE_HEADERS]
    assert type(dict((f[0], f) for f in response.headers)[b"x-secret"]) is NeverIndexedHeaderTuple
    assert type(trailers.headers[0]) is NeverIndexedHeaderTuple


# -- streams both ways ------------------------------------------------------------


def test_stream_ids_are_rewritten_both_ways(h):
    one, two = h.caller(), h.caller()
    one.call(1)
    two.call(1)
    one.call(3)
    upstream = h.tunnels["alpha"].upstream
    assert [f.stream_id for f in forwarded(upstream)] == [1, 3, 5]
    upstream.respond(5, b"to-one-3")
    upstream.respond(3, b"to-two-1")
    assert only(one.frames(), TYPE_DATA, 3)[0].payload == h2.grpc_message(b"to-one-3")
    assert only(two.frames(), TYPE_DATA, 1)[0].payload == h2.grpc_message(b"to-two-1")


def test_data_is_forwarded_both_ways(h):
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, h2.grpc_message(b"request"), end_stream=True))
    upstream = h.tunnels["alpha"].upstream
    (sent,) = only(upstream.frames(), TYPE_DATA, 1)
    assert sent.payload == h2.grpc_message(b"request") and sent.end_stream
    upstream.respond(1, b"response")
    frames = caller.frames()
    assert only(frames, TYPE_DATA, 1)[0].payload == h2.grpc_message(b"response")
    assert h.ended == [("alpha", "OK", 12, 13)]


def test_trailers_are_forwarded(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.tunnels["alpha"].upstream.respond(
        1, b"r", trailers=[(b"grpc-status", b"3"), (b"grpc-message", b"bad"), (b"x-t", b"1")])
    assert status_of(caller, 1) == (3, "bad", False)
    assert h.ended[-1][:2] == ("alpha", "INVALID_ARGUMENT")


def test_trailers_only_response_is_forwarded(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.tunnels["alpha"].upstream.headers(
        1, RESPONSE + [(b"grpc-status", b"12"), (b"grpc-message", b"nope")], end_stream=True)
    assert status_of(caller, 1) == (12, "nope", True)
    assert h.ended[-1][:2] == ("alpha", "UNIMPLEMENTED")


def test_caller_reset_is_forwarded_upstream(h):
    caller = h.caller()
    caller.call(1)
    caller.send(h2.rst_stream(1, ERROR_CANCEL))
    (reset,) = only(h.tunnels["alpha"].upstream.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_CANCEL
    assert h.ended[-1][:2] == ("alpha", "CANCELLED")


def test_upstream_reset_is_forwarded_to_the_caller(h):
    caller = h.caller()
    caller.call(1)
    h.tunnels["alpha"].upstream.send(h2.rst_stream(1, ERROR_INTERNAL_ERROR))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_INTERNAL_ERROR


def test_caller_connection_lost_cancels_its_upstream_streams(h):
    caller = h.caller()
    caller.call(1)
    caller.call(3)
    caller.protocol.connectionLost(Failure(ConnectionLost()))
    resets = only(h.tunnels["alpha"].upstream.frames(), TYPE_RST_STREAM)
    assert sorted((r.stream_id, r.error_code) for r in resets) == [
        (1, ERROR_CANCEL), (3, ERROR_CANCEL)]
    assert not h.router.calls


def test_response_end_resets_the_request_side_with_no_error(h):
    caller = h.caller()
    caller.call(1)  # the caller is still sending
    upstream = h.tunnels["alpha"].upstream
    upstream.respond(1)
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_NO_ERROR


# -- limits ---------------------------------------------------------------------


def limits(**settings):
    """The router's limits under ServerSettings with ``settings``."""
    return RouterLimits.from_settings(ServerSettings(**settings))


def test_max_calls_is_resource_exhausted_until_one_ends():
    h = RouterHarness(limits=limits(max_proxy_calls=1))
    h.client("alpha")
    caller = h.caller()
    caller.call(1, end_stream=True)
    caller.call(3, end_stream=True)
    assert "1 calls in progress" in refused(caller, 3, 8)
    h.tunnels["alpha"].upstream.respond(1)
    caller.call(5, end_stream=True)
    assert len(forwarded(h.tunnels["alpha"].upstream)) == 2


def test_max_calls_per_client_is_resource_exhausted_for_that_client_only():
    h = RouterHarness(limits=limits(max_calls_per_client=1))
    h.client("alpha")
    h.client("beta")
    caller = h.caller()
    caller.call(1, end_stream=True)
    caller.call(3, end_stream=True)
    caller.call(5, client_id="beta", end_stream=True)
    assert "alpha" in refused(caller, 3, 8)
    assert forwarded(h.tunnels["beta"].upstream)
    assert ("alpha", "RESOURCE_EXHAUSTED", 0, 0) in h.ended


def limited(size):
    h = RouterHarness(limits=limits(max_message_size=size))
    h.client("alpha")
    return h


def test_request_message_over_the_limit_is_resource_exhausted():
    h = limited(10)
    caller = h.caller()
    caller.call(1)
    prefix = h2.grpc_message(b"x" * 11)[:5]
    caller.send(h2.data(1, prefix[:3]))  # the prefix split across DATA frames
    assert not only(caller.frames(), TYPE_HEADERS, 1)
    caller.send(h2.data(1, prefix[3:]))
    assert "11 bytes" in refused(caller, 1, 8)
    upstream_frames = h.tunnels["alpha"].upstream.frames()
    assert only(upstream_frames, TYPE_RST_STREAM, 1)[0].error_code == ERROR_CANCEL


def test_request_messages_at_the_limit_pass():
    h = limited(10)
    caller = h.caller()
    caller.call(1)
    stream = h2.grpc_message(b"x" * 10) * 3
    for offset in range(0, len(stream), 4):
        caller.send(h2.data(1, stream[offset:offset + 4]))
    upstream = h.tunnels["alpha"].upstream
    assert b"".join(f.payload for f in only(upstream.frames(), TYPE_DATA, 1)) == stream
    assert not only(caller.frames(), TYPE_HEADERS)


def test_response_message_over_the_limit_is_resource_exhausted_after_headers():
    h = limited(10)
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.send(h2.data(1, h2.grpc_message(b"y" * 11)))
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (8, False) and "response" in message
    assert not only(caller.received, TYPE_DATA, 1)
    assert only(upstream.frames(), TYPE_RST_STREAM, 1)


def test_header_list_over_the_limit_is_resource_exhausted_and_the_connection_stays():
    h = RouterHarness(caller=H2Config(max_header_list_size=1000))
    h.client("alpha")
    caller = h.caller()
    caller.call(1, extra=[(b"x-big", b"v" * 1000)])
    assert "larger than the limit" in refused(caller, 1, 8)
    caller.call(3)
    assert [f.stream_id for f in forwarded(h.tunnels["alpha"].upstream)] == [1]
    assert not caller.disconnecting


# -- flow control ---------------------------------------------------------------


def windowless():
    """alpha's upstream grants a 0-byte stream window: nothing goes until it credits."""
    h = RouterHarness(caller=H2Config(initial_window=1000))
    h.client("alpha", settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    return h


def test_caller_window_is_credited_only_once_its_data_went_upstream():
    h = windowless()
    caller = h.caller()
    caller.call(1)
    caller.frames()
    caller.send(h2.data(1, b"x" * 600))
    assert not only(caller.frames(), TYPE_WINDOW_UPDATE, 1)
    upstream = h.tunnels["alpha"].upstream
    upstream.send(h2.window_update(1, 400))
    assert not only(caller.frames(), TYPE_WINDOW_UPDATE, 1)  # 400 < half the window
    upstream.send(h2.window_update(1, 400))
    (credit,) = only(caller.frames(), TYPE_WINDOW_UPDATE, 1)
    assert credit.increment == 600
    assert sum(len(f.payload) for f in only(upstream.frames(), TYPE_DATA, 1)) == 600


def test_response_waits_for_the_callers_window():
    h = RouterHarness()
    h.client("alpha")
    caller = h.caller(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 10)])
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.send(h2.data(1, b"z" * 25))
    upstream.headers(1, OK_TRAILERS, end_stream=True)
    frames = caller.frames()
    assert [len(f.payload) for f in only(frames, TYPE_DATA, 1)] == [10]
    assert len(only(frames, TYPE_HEADERS, 1)) == 1  # the trailers wait behind the DATA
    caller.send(h2.window_update(1, 100))
    frames = caller.frames()
    assert [len(f.payload) for f in only(frames, TYPE_DATA, 1)] == [15]
    assert only(frames, TYPE_HEADERS, 1)[0].end_stream


def test_stalled_caller_does_not_stall_another_on_the_same_upstream():
    h = RouterHarness(upstream=H2Config(initial_window=65536, idle_timeout=0,
                                        preface_timeout=0))
    h.client("alpha")
    stalled = h.caller(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 1)])
    moving = h.caller()
    stalled.call(1, end_stream=True)
    moving.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    assert len(h.tunnels["alpha"].upstreams) == 1
    upstream.headers(1, RESPONSE)
    upstream.headers(3, RESPONSE)
    upstream.frames()
    for _ in range(4):
        upstream.send(h2.data(1, b"s" * 16000))  # 64,000 bytes the stalled caller never reads
    for _ in range(8):
        upstream.send(h2.data(3, b"m" * 16000))  # twice that for the moving one
        moving.send(h2.window_update(1, 16000), h2.window_update(0, 16000))
    assert sum(len(f.payload) for f in only(moving.frames(), TYPE_DATA, 1)) == 128000
    credits = only(upstream.frames(), TYPE_WINDOW_UPDATE)
    assert sum(c.increment for c in credits if c.stream_id == 3) >= 128000 - 65536
    assert sum(c.increment for c in credits if c.stream_id == 1) == 0  # only 1 byte left
    assert not upstream.disconnecting


def test_caller_that_stops_reading_holds_back_only_its_own_calls():
    # A caller may grant huge windows and then not read its socket: what the router
    # writes it must then wait in the router, within its windows, not pile up in the
    # transport's buffer with the upstream credited as if it had been delivered.
    h = RouterHarness(upstream=H2Config(initial_window=65536, idle_timeout=0,
                                        preface_timeout=0))
    h.client("alpha")
    stuck = h.caller(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 2**31 - 1)])
    stuck.send(h2.window_update(0, 2**31 - 1 - 65535))
    moving = h.caller()
    stuck.call(1, end_stream=True)
    moving.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.headers(3, RESPONSE)
    stuck.transport.producer.pauseProducing()  # its socket buffer is full
    stuck.frames()
    upstream.frames()
    for _ in range(4):
        upstream.send(h2.data(1, b"s" * 16000), h2.data(3, b"m" * 16000))
        moving.send(h2.window_update(1, 16000), h2.window_update(0, 16000))
    assert not only(stuck.frames(), TYPE_DATA)
    assert sum(len(f.payload) for f in only(moving.frames(), TYPE_DATA, 1)) == 64000
    credits = only(upstream.frames(), TYPE_WINDOW_UPDATE)
    assert not [c for c in credits if c.stream_id == 1]
    assert [c for c in credits if c.stream_id == 3]
    stuck.transport.producer.resumeProducing()
    assert sum(len(f.payload) for f in only(stuck.frames(), TYPE_DATA, 1)) == 64000
    assert [c for c in only(upstream.frames(), TYPE_WINDOW_UPDATE) if c.stream_id == 1]


def test_budget_holds_credits_back_while_the_router_holds_too_much():
    budget = Budget(1000)
    h = RouterHarness(caller=H2Config(initial_window=1000), budget=budget)
    h.client("alpha", settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    h.client("beta")
    stuck, other = h.caller(), h.caller()
    stuck.call(1)
    stuck.send(h2.data(1, b"x" * 1000))  # waits: alpha's upstream grants no window
    other.call(1, client_id="beta")
    other.frames()
    other.send(h2.data(1, b"y" * 500))
    assert only(h.tunnels["beta"].upstream.frames(), TYPE_DATA, 1)  # forwarded at once
    assert [f.increment for f in only(other.frames(), TYPE_WINDOW_UPDATE, 1)] == [500]
    budget.add(1)  # the router now holds more than the budget
    other.send(h2.data(1, b"y" * 500))
    assert only(h.tunnels["beta"].upstream.frames(), TYPE_DATA, 1)
    assert not only(other.frames(), TYPE_WINDOW_UPDATE, 1)  # its credit waits
    h.tunnels["alpha"].upstream.send(h2.window_update(1, 1000))  # alpha drains
    budget.remove(1)
    assert [f.increment for f in only(other.frames(), TYPE_WINDOW_UPDATE, 1)] == [500]


def test_connection_window_is_shared_in_turn_by_blocked_streams(h):
    caller = h.caller()
    for stream_id in (1, 3, 5):
        caller.call(stream_id, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    for stream_id in (1, 3, 5):
        upstream.headers(stream_id, RESPONSE)
        upstream.send(h2.data(stream_id, b"d" * 30000))  # 90,000 > the caller's 65,535
    for stream_id in (1, 3):
        upstream.send(h2.data(stream_id, b"e" * 100))  # they wait too
    caller.frames()
    turns = []
    for _ in range(6):
        caller.send(h2.window_update(0, 1))
        turns += [f.stream_id for f in only(caller.frames(), TYPE_DATA)]
    assert turns == [5, 1, 3, 5, 1, 3]


def test_upstream_data_beyond_its_stream_window_is_flow_control_error():
    h = RouterHarness(upstream=H2Config(initial_window=1000, idle_timeout=0,
                                        preface_timeout=0))
    h.client("alpha")
    caller = h.caller(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.frames()
    upstream.send(h2.data(1, b"x" * 1000))
    assert not only(upstream.frames(), TYPE_RST_STREAM)
    upstream.send(h2.data(1, b"x"))
    (reset,) = only(upstream.frames(), TYPE_RST_STREAM, 1)
    assert reset.error_code == ERROR_FLOW_CONTROL_ERROR
    assert not upstream.disconnecting


def test_connection_window_is_credited_on_receipt_upstream(h):
    caller = h.caller(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    first, window = upstream.frames()[:2]
    assert (window.stream_id, window.increment) == (0, 2**31 - 1 - 65535)
    # The stream's DATA waits for the caller; the connection's window is not held.
    upstream.send(h2.data(1, b"q" * 16384) * 8)
    assert upstream.protocol.receive_credit_owed == 8 * 16384


# -- hostile callers ----------------------------------------------------------------


def test_rapid_reset_is_enhance_your_calm_and_reaches_upstream_at_most_the_burst(h):
    h = RouterHarness(caller=H2Config(reset_burst=20, reset_rate=0.001))
    h.client("alpha")
    caller = h.caller()
    for stream_id in range(1, 2 * 100, 2):
        caller.call(stream_id)
        caller.send(h2.rst_stream(stream_id, ERROR_CANCEL))
        if caller.disconnecting:
            break
    goaway = only(caller.frames(), TYPE_GOAWAY)
    assert goaway and goaway[0].error_code == ERROR_ENHANCE_YOUR_CALM
    assert len(forwarded(h.tunnels["alpha"].upstream)) <= 21
    assert not h.router.calls


PROVOKED = {
    "WINDOW_UPDATE of 0": lambda caller, stream_id: caller.send(h2.window_update(stream_id, 0)),
    "trailers without END_STREAM": lambda caller, stream_id: caller.headers(
        stream_id, [(b"x-t", b"1")]),
    "HEADERS after END_STREAM": lambda caller, stream_id: (
        caller.send(h2.data(stream_id, b"", end_stream=True)),
        caller.headers(stream_id, [(b"x-t", b"1")], end_stream=True)),
}


@pytest.mark.parametrize("name", sorted(PROVOKED))
def test_resets_the_caller_provokes_count_as_rapid_reset(name):
    # "MadeYouReset" (CVE-2025-8671): a frame that makes us reset the stream costs
    # the upstream the same as a RST_STREAM from the caller.
    h = RouterHarness(caller=H2Config(reset_burst=20, reset_rate=0.001))
    h.client("alpha")
    caller = h.caller()
    for stream_id in range(1, 2 * 100, 2):
        caller.call(stream_id)
        PROVOKED[name](caller, stream_id)
        if caller.disconnecting:
            break
    goaway = only(caller.frames(), TYPE_GOAWAY)
    assert goaway and goaway[0].error_code == ERROR_ENHANCE_YOUR_CALM
    assert len(forwarded(h.tunnels["alpha"].upstream)) <= 21


def test_resets_within_the_burst_are_fine():
    h = RouterHarness(caller=H2Config(reset_burst=20, reset_rate=0.001))
    h.client("alpha")
    caller = h.caller()
    for stream_id in range(1, 40, 2):
        caller.call(stream_id)
        caller.send(h2.rst_stream(stream_id, ERROR_CANCEL))
    assert not caller.disconnecting


# -- upstream lifecycle -----------------------------------------------------------


def test_upstream_max_concurrent_streams_opens_more_connections_up_to_four():
    h = RouterHarness()
    tunnel = h.client("alpha", settings=[(SETTINGS_MAX_CONCURRENT_STREAMS, 1)])
    caller = h.caller()
    for stream_id in (1, 3, 5, 7, 9):
        caller.call(stream_id, end_stream=True)
    assert len(tunnel.upstreams) == 4
    assert [len(forwarded(u)) for u in tunnel.upstreams] == [1, 1, 1, 1]
    tunnel.upstreams[2].respond(1)  # a stream frees: the waiting call takes it
    (waited,) = forwarded(tunnel.upstreams[2])
    assert waited.stream_id == 3
    assert len(tunnel.upstreams) == 4


def test_calls_wait_while_the_upstream_connects():
    h = RouterHarness()
    tunnel = h.client("alpha", hold=True)
    caller = h.caller()
    caller.call(1)
    caller.send(h2.data(1, b"early", end_stream=True))
    caller.call(3, end_stream=True)
    assert len(tunnel.upstreams) == 1  # one connection is opened, not one per call
    tunnel.release()
    upstream = tunnel.upstream
    frames = upstream.frames()
    assert [f.stream_id for f in only(frames, TYPE_HEADERS)] == [1, 3]
    (early,) = only(frames, TYPE_DATA, 1)
    assert early.payload == b"early" and early.end_stream


def test_upstream_goaway_refuses_streams_above_its_last_id_and_new_calls_go_elsewhere(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    caller.call(3, end_stream=True)
    tunnel = h.tunnels["alpha"]
    first = tunnel.upstream
    first.send(h2.goaway(1))
    (reset,) = only(caller.frames(), TYPE_RST_STREAM)
    assert (reset.stream_id, reset.error_code) == (3, ERROR_REFUSED_STREAM)
    caller.call(5, end_stream=True)
    assert len(tunnel.upstreams) == 2 and forwarded(tunnel.upstream, 1)
    first.respond(1)
    assert status_of(caller, 1)[0] == 0
    assert first.disconnecting  # its last stream ended


def test_upstream_lost_before_a_response_is_unavailable_trailers_only(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.tunnels["alpha"].upstream.protocol.connectionLost(Failure(ConnectionLost()))
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (14, True)
    assert "client 'alpha'" in message


def test_upstream_that_never_answered_is_cannot_reach_its_grpc_server():
    h = RouterHarness()
    tunnel = h.client("alpha", settings=None)
    caller = h.caller()
    caller.call(1, end_stream=True)
    tunnel.upstream.protocol.connectionLost(Failure(ConnectionLost()))
    assert "client 'alpha' cannot reach its gRPC server" in refused(caller, 1, 14)


def test_upstream_silent_past_its_preface_timeout_is_unavailable():
    h = RouterHarness(upstream=H2Config(preface_timeout=10, idle_timeout=0))
    tunnel = h.client("alpha", settings=None)  # accepts, never speaks HTTP/2
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.clock.advance(10)
    assert only(tunnel.upstream.frames(), TYPE_GOAWAY) and tunnel.upstream.disconnecting
    assert "cannot reach its gRPC server" in refused(caller, 1, 14)


def test_upstream_connect_failure_is_unavailable_naming_the_client():
    h = RouterHarness()
    h.client("alpha", refuse=ConnectionRefusedError("stream refused"))
    caller = h.caller()
    caller.call(1, end_stream=True)
    message = refused(caller, 1, 14)
    assert "client 'alpha'" in message and "stream refused" in message


def test_upstream_lost_after_a_response_started_is_unavailable_trailers(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.headers(1, RESPONSE)
    upstream.protocol.connectionLost(Failure(ConnectionLost()))
    code, message, trailers_only = status_of(caller, 1)
    assert (code, trailers_only) == (14, False)
    assert "client 'alpha'" in message
    assert h.ended[-1][:2] == ("alpha", "UNAVAILABLE")


def test_new_call_after_the_upstream_was_lost_opens_a_fresh_connection(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    tunnel = h.tunnels["alpha"]
    tunnel.upstream.protocol.connectionLost(Failure(ConnectionLost()))
    caller.call(3, end_stream=True)
    assert len(tunnel.upstreams) == 2 and forwarded(tunnel.upstream, 1)


def test_stream_ids_near_the_end_move_to_a_fresh_connection(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    tunnel = h.tunnels["alpha"]
    first = tunnel.upstream
    first.respond(1)
    last = 2**31 - 1 - 2000  # the connection keeps a margin below 2^31 - 1
    first.protocol.skip_stream_ids(last)
    caller.call(3, end_stream=True)
    assert forwarded(first)[-1].stream_id == last
    caller.call(5, end_stream=True)
    assert len(tunnel.upstreams) == 2 and forwarded(tunnel.upstream, 1)


def test_upstream_header_table_size_is_honoured_up_to_ours(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.reader.decoder.max_allowed_table_size = 2**20  # see what we would use
    upstream.send(h2.settings((SETTINGS_HEADER_TABLE_SIZE, 2**20)))
    for stream_id in range(3, 40, 2):
        caller.call(stream_id, end_stream=True, extra=[(b"x-%d" % stream_id, b"v" * 500)])
    forwarded(upstream)
    assert upstream.reader.decoder.header_table.maxsize <= 4096
    upstream.send(h2.settings((SETTINGS_HEADER_TABLE_SIZE, 0)))
    caller.call(41, end_stream=True, extra=[(b"x-new", b"v")])
    forwarded(upstream)
    assert upstream.reader.decoder.header_table.maxsize == 0


def pinged_upstream(h):
    """A call in progress whose upstream has just sent a PING; (caller, upstream)."""
    caller = h.caller()
    caller.call(1)
    upstream = h.tunnels["alpha"].upstream
    upstream.frames()
    upstream.send(h2.ping(b"upstream"))
    return caller, upstream


def test_upstream_ping_is_answered(h):
    _, upstream = pinged_upstream(h)
    assert upstream.frames() == []  # held for the next request, or the ack delay
    h.clock.advance(H2Config().ping_ack_delay)
    (answer,) = upstream.frames()
    assert answer.ack and answer.payload == b"upstream"


def test_upstream_ping_ack_rides_with_the_next_request(h):
    caller, upstream = pinged_upstream(h)
    caller.send(h2.data(1, b"more", end_stream=True))
    ack, data = upstream.frames()
    assert ack.type == TYPE_PING and ack.ack and ack.payload == b"upstream"
    assert data.type == TYPE_DATA and data.payload == b"more"


def test_client_leaving_abruptly_fails_its_calls_as_unavailable(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.tunnels["alpha"].session.closed = True
    h.router.client_left("alpha", graceful=False)
    code, message, _ = status_of(caller, 1)
    assert code == 14 and "alpha" in message and "disconnected" in message


def test_client_leaving_gracefully_lets_calls_finish(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    h.router.client_left("alpha", graceful=True)
    assert only(upstream.frames(), TYPE_GOAWAY)
    upstream.respond(1)
    assert status_of(caller, 1)[0] == 0
    assert upstream.disconnecting


def test_every_call_is_counted_once(h):
    caller = h.caller()
    caller.call(1)
    upstream = h.tunnels["alpha"].upstream
    upstream.send(h2.rst_stream(1, ERROR_REFUSED_STREAM))
    caller.send(h2.rst_stream(1, ERROR_CANCEL))
    caller.call(3)
    caller.send(h2.rst_stream(3, ERROR_CANCEL))
    upstream.respond(3)
    assert h.ended == [("alpha", "UNAVAILABLE", 0, 0), ("alpha", "CANCELLED", 0, 0)]
    assert h.router.calls_to("alpha") == 0 and not h.router.calls


def test_client_leaving_with_no_calls_closes_its_upstream_connections(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    upstream.respond(1)
    h.router.client_left("alpha", graceful=True)
    assert only(upstream.frames(), TYPE_GOAWAY) and upstream.disconnecting
    assert h.router.upstream_clients() == set()


# -- graceful drain ------------------------------------------------------------------


def test_drain_sends_goaway_and_closes_once_streams_end(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    h.router.drain()
    (goaway,) = only(caller.frames(), TYPE_GOAWAY)
    assert (goaway.error_code, goaway.last_stream_id) == (ERROR_NO_ERROR, 1)
    caller.call(3, end_stream=True)
    (reset,) = only(caller.frames(), TYPE_RST_STREAM, 3)
    assert reset.error_code == ERROR_REFUSED_STREAM
    assert not caller.disconnecting
    h.tunnels["alpha"].upstream.respond(1)
    assert status_of(caller, 1)[0] == 0
    assert caller.disconnecting


def test_drain_closes_an_idle_caller_at_once(h):
    caller = h.caller()
    h.router.drain()
    assert only(caller.frames(), TYPE_GOAWAY) and caller.disconnecting


def test_cancel_all_fails_the_calls_left_and_closes_every_connection(h):
    caller = h.caller()
    caller.call(1, end_stream=True)
    upstream = h.tunnels["alpha"].upstream
    h.router.drain()
    h.router.cancel_all()
    code, message, _ = status_of(caller, 1)
    assert code == 14 and "shutting down" in message
    assert caller.disconnecting
    assert only(upstream.frames(), TYPE_RST_STREAM, 1) and upstream.disconnecting


def test_caller_arriving_while_draining_is_drained(h):
    h.router.drain()
    caller = h.caller()
    h.clock.advance(0)
    assert only(caller.frames(), TYPE_GOAWAY) and caller.disconnecting


@pytest.mark.parametrize("piece", [1, 7, 16384 + 5])
def test_frames_split_anywhere_across_reads_arrive_whole(h, piece):
    # Reads end mid-header and mid-payload, on the caller's side and the upstream's.
    def send_in_pieces(peer, data):
        for start in range(0, len(data), piece):
            peer.protocol.dataReceived(data[start:start + piece])

    caller = h.caller()
    request_block = h2.headers(caller.encoder, 1, request(), False)
    body = h2.grpc_message(b"q" * 40000)
    frames = [h2.data(1, body[i:i + 16000]) for i in range(0, len(body), 16000)]
    send_in_pieces(caller, request_block + b"".join(frames) + h2.data(1, b"", end_stream=True))
    upstream = h.tunnels["alpha"].upstream
    sent = upstream.frames()
    assert b"".join(f.payload for f in sent if f.type == TYPE_DATA) == body
    reply = h2.grpc_message(b"r" * 30000)
    send_in_pieces(upstream, h2.headers(upstream.encoder, 1, RESPONSE, False)
                   + b"".join(h2.data(1, reply[i:i + 16000]) for i in range(0, len(reply), 16000))
                   + h2.headers(upstream.encoder, 1, OK_TRAILERS, True))
    received = caller.frames()
    assert b"".join(f.payload for f in received if f.type == TYPE_DATA) == reply
    assert status_of(caller, 1)[0] == 0
