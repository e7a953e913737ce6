"""Tests for grpcmux.rpc.proxy through a running ProxyService and a real backend."""

import grpc
import pytest
import pytest_twisted

from rpc_backend import Mux, Tunnel, start_call

OK = grpc.StatusCode.OK


@pytest_twisted.async_yield_fixture
async def mux(reactor, tmp_path):
    m = Mux(reactor, tmp_path)
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
