"""Tests for the router (grpcmux.http2) through a running ProxyService and a real backend."""

import re

import grpc
import pytest
import pytest_twisted

from rpc_backend import ENGINES, Mux, Tunnel, start_call

OK = grpc.StatusCode.OK


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def mux(request, reactor, tmp_path):
    m = Mux(reactor, tmp_path, **ENGINES[request.param])
    m.connect("alpha")
    yield m
    await m.stop()


ROUTE = (("client-id", "alpha"),)


@pytest.mark.parametrize(
    "kind, request_, expected",
    [
        ("Unary", b"ping", [b"ping"]),
        ("ServerStream", b"s", [b"s", b"s", b"s"]),
        ("ClientStream", [b"a", b"b", b"c"], [b"a|b|c"]),
        ("Bidi", [b"x", b"y"], [b"x", b"y"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_four_call_kinds_pass_through(mux, kind, request_, expected):
    result = await mux.invoke(kind, request_, ROUTE + (("x-count", "3"),))
    assert (result.code, result.responses) == (OK, expected), result.details
    assert mux.backend.next_call().method == f"/test.Echo/{kind}"


@pytest_twisted.ensureDeferred
async def test_metadata_headers_and_trailers_pass_through(mux):
    sent = (
        ("x-text", "one"),
        ("x-text", "two"),
        ("x-blob-bin", b"\x00\xff\x10"),
        ("x-echo-metadata", "1"),
        ("x-trailer-t-bin", b"\x01\x02"),
        ("x-trailer-plain", "end"),
    )
    result = await mux.invoke("Bidi", [b"m"], ROUTE + sent)
    assert result.code == OK
    record = mux.backend.next_call()
    seen = record.metadata
    assert "client-id" not in dict(seen)
    assert list(seen) == list(sent)
    # The router names itself in via, as HTTP proxies do (that is how it sees loops).
    assert re.fullmatch(r"2 grpcmux-[0-9a-f]{16}", record.via)
    assert list(result.headers) == list(sent)
    assert list(result.trailers) == [("t-bin", b"\x01\x02"), ("plain", "end")]


@pytest.mark.parametrize("kind", ["Unary", "Bidi"])
@pytest_twisted.ensureDeferred
async def test_error_status_with_headers_and_details_passes_through(mux, kind):
    details_bin = b"\x08\x09\x12\x04nope"
    result = await mux.invoke(kind, b"r" if kind == "Unary" else [b"r"], ROUTE + (
        ("x-header-h", "early"),
        ("x-trailer-t", "late"),
        ("x-fail", "FAILED_PRECONDITION nope, really"),
        ("x-fail-details-bin", details_bin),
    ))
    assert result.responses == []
    assert (result.code, result.details) == (
        grpc.StatusCode.FAILED_PRECONDITION, "nope, really")
    assert result.headers == (("h", "early"),)
    assert ("grpc-status-details-bin", details_bin) in result.trailers


@pytest_twisted.ensureDeferred
async def test_backend_unavailable_status_is_not_rewritten(mux):
    result = await mux.invoke("Unary", b"r", ROUTE + (("x-fail", "UNAVAILABLE busy"),))
    assert (result.code, result.details) == (grpc.StatusCode.UNAVAILABLE, "busy")


@pytest_twisted.ensureDeferred
async def test_64_mib_message_both_ways(mux):
    big = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    result = await mux.invoke("Unary", big, ROUTE, timeout=30.0)
    assert result.code == OK, result.details
    assert result.responses[0] == big


@pytest_twisted.ensureDeferred
async def test_compression_on_both_hops(mux):
    message = b"compressible " * 10000
    result = await mux.invoke("Bidi", [message, message], ROUTE + (("x-gzip", "1"),),
                              compression=grpc.Compression.Gzip)
    assert result.responses == [message, message]
    deflate_channel = grpc.insecure_channel(mux.address, compression=grpc.Compression.Deflate)
    try:
        result = await mux.invoke("ServerStream", message, ROUTE + (("x-gzip", "1"),),
                                  channel=deflate_channel)
    finally:
        deflate_channel.close()
    assert result.responses == [message]


@pytest_twisted.ensureDeferred
async def test_max_message_size_bounds_messages(reactor, tmp_path):
    mux = Mux(reactor, tmp_path, settings={"max_message_size": 1024 * 1024})
    try:
        mux.connect("alpha")
        small = await mux.invoke("Unary", b"s" * 1000, ROUTE)
        big = await mux.invoke("Unary", b"b" * (2 * 1024 * 1024), ROUTE)
    finally:
        await mux.stop()
    assert small.code == OK
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest_twisted.ensureDeferred
async def test_deadline_is_propagated(mux):
    result = await mux.invoke("Unary", b"r", ROUTE, timeout=8.0)
    assert result.code == OK
    remaining = mux.backend.next_call().time_remaining
    # grpc-timeout travels in coarse units, rounded up.
    assert remaining is not None and 0 < remaining <= 8.1


@pytest_twisted.ensureDeferred
async def test_no_deadline_stays_none(mux):
    call = await mux.in_thread(lambda: mux.channel.unary_unary("/test.Echo/Unary")(
        b"r", metadata=ROUTE))
    assert call == b"r"
    assert mux.backend.next_call().time_remaining is None


@pytest_twisted.ensureDeferred
async def test_deadline_expiry_reaches_backend(mux):
    result = await mux.invoke("ServerStream", b"r", ROUTE + (("x-wait", "1"),), timeout=0.5)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    record = mux.backend.next_call()
    assert await mux.in_thread(record.settled.wait, 10)
    assert record.outcome == "deadline"


@pytest_twisted.ensureDeferred
async def test_caller_cancel_reaches_backend(mux):
    pending = start_call(mux.channel, "Bidi", [b"r"], ROUTE + (("x-wait", "1"),))
    record = await mux.in_thread(mux.backend.next_call)
    pending.cancel()
    assert await mux.in_thread(record.settled.wait, 10)
    assert record.outcome == "cancelled"
    result = await mux.in_thread(pending.finish)
    assert result.code == grpc.StatusCode.CANCELLED


@pytest_twisted.ensureDeferred
async def test_broken_tunnel_gives_unavailable_naming_client(reactor, mux):
    tunnel = Tunnel(reactor, str(mux.tmp_path / "tunnel.sock"), mux.backend.socket_path)
    try:
        mux.connect("beta", tunnel.socket_path)
        pending = start_call(mux.channel, "Bidi", [b"r"], (("client-id", "beta"), ("x-wait", "1")))
        record = await mux.in_thread(mux.backend.next_call)
        tunnel.abort()
        result = await mux.in_thread(pending.finish)
        assert await mux.in_thread(record.settled.wait, 10)
    finally:
        await tunnel.close()
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.details.startswith("client 'beta' is unavailable: ")
    assert record.outcome == "cancelled"


@pytest_twisted.ensureDeferred
async def test_missing_socket_gives_unavailable_naming_client(mux):
    mux.connect("ghost", str(mux.tmp_path / "nothing-here.sock"))
    result = await mux.invoke("Unary", b"r", (("client-id", "ghost"),))
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.details.startswith("client 'ghost' is unavailable: ")


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_call_gives_unavailable_and_new_socket_is_used(
        reactor, tmp_path, mux):
    pending = start_call(mux.channel, "Bidi", [b"r"], ROUTE + (("x-wait", "1"),))
    record = await mux.in_thread(mux.backend.next_call)
    mux.registry.remove("alpha")
    result = await mux.in_thread(pending.finish)
    assert (result.code, result.details) == (
        grpc.StatusCode.UNAVAILABLE, "client 'alpha' is unavailable: it disconnected")
    assert await mux.in_thread(record.settled.wait, 10)
    assert record.outcome == "cancelled"

    # The same id comes back through another socket: the proxy follows it.
    tunnel = Tunnel(reactor, str(tmp_path / "again.sock"), mux.backend.socket_path)
    try:
        mux.connect("alpha", tunnel.socket_path)
        result = await mux.invoke("Unary", b"back", ROUTE)
    finally:
        await tunnel.close()
    assert (result.code, result.responses) == (OK, [b"back"])


@pytest_twisted.ensureDeferred
async def test_client_leaving_gracefully_lets_its_calls_finish(reactor, tmp_path, mux):
    tunnel = Tunnel(reactor, str(tmp_path / "leaving.sock"), mux.backend.socket_path)
    try:
        mux.connect("leaver", tunnel.socket_path)
        route = (("client-id", "leaver"),)
        pending = start_call(mux.channel, "ServerStream", b"r", route + (("x-wait", "1"),))
        record = await mux.in_thread(mux.backend.next_call)
        mux.registry.remove("leaver", graceful=True)
        result = await mux.invoke("Unary", b"new", route)
        assert result.code == grpc.StatusCode.NOT_FOUND  # nothing new is routed to it
        assert not record.ended.is_set()  # the call in flight goes on
        pending.cancel()
        await mux.in_thread(record.settled.wait, 10)
        # Its last call done, the proxy closes its connection through the tunnel.
        await tunnel.when_idle().addTimeout(10, reactor)
    finally:
        await tunnel.close()


# routing


@pytest_twisted.async_yield_fixture
async def routed(reactor, tmp_path):
    m = Mux(reactor, tmp_path, settings={"authority_domain": "mux.example.org",
                                   "default_client_id": "dflt"})
    for client_id in ("alpha", "beta", "dflt"):
        m.connect(client_id)
    yield m
    await m.stop()


def _channel_with_authority(mux, authority):
    return grpc.insecure_channel(mux.address, options=[("grpc.default_authority", authority)])


@pytest.mark.parametrize(
    "authority, metadata, expected",
    [
        ("beta.mux.example.org:443", (("client-id", "alpha"),), "alpha"),  # metadata first
        ("beta.mux.example.org:443", (), "beta"),
        ("beta.MUX.example.org", (), "beta"),
        ("other.example.org", (), "dflt"),
        ("mux.example.org", (), "dflt"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routing_order(routed, authority, metadata, expected):
    channel = _channel_with_authority(routed, authority)
    try:
        result = await routed.invoke("Unary", b"r", metadata, channel=channel)
    finally:
        channel.close()
    assert result.code == OK, result.details
    # All clients share one backend: the id the call went to shows once it is gone.
    routed.registry.remove(expected)
    channel = _channel_with_authority(routed, authority)
    try:
        result = await routed.invoke("Unary", b"r", metadata, channel=channel)
    finally:
        channel.close()
    assert result.code == grpc.StatusCode.NOT_FOUND
    assert result.details == f"client '{expected}' is not connected"


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ((("client-id", "alpha"), ("client-id", "beta")), "exactly one value, got 2"),
        ((("client-id", ""),), "'client-id' is empty"),
        ((), "'client-id'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routing_errors(mux, metadata, fragment):
    result = await mux.invoke("Unary", b"r", metadata)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in result.details


@pytest_twisted.ensureDeferred
async def test_unknown_client_is_not_found(mux):
    result = await mux.invoke("Bidi", [b"r"], (("client-id", "nobody"),))
    assert (result.code, result.details) == (
        grpc.StatusCode.NOT_FOUND, "client 'nobody' is not connected")
