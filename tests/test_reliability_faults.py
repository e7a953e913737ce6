"""Faults with real processes on loopback (issue 6): every failure becomes a prompt,
clear gRPC status and a clean reconnect.

The scenarios live in ``tests/reliability_kit/scenarios.py`` (shared with
``benchmarks/reliability.py``); each returns its figures and these tests assert
the bounds the issue names.  Keepalive is (1 s interval, 1 s timeout) here;
``SLACK`` allows for process scheduling on a loaded CI machine.
"""

import grpc
import pytest_twisted

from mux_stack import Stack
from reliability_kit import scenarios

SLACK = 0.5


@pytest_twisted.ensureDeferred
async def test_client_killed_fails_streams_within_a_second(reactor, tmp_path):
    figures = await scenarios.client_killed(reactor, tmp_path)
    assert figures["codes"] == ["UNAVAILABLE"]
    assert figures["details_name_client"]
    assert figures["failed_within_s"] < 1.0
    assert figures["echo_errors"] == []
    assert figures["watch_disconnected_s"] < 1.0
    assert "edge-kill" not in figures["listed_after"]


@pytest_twisted.ensureDeferred
async def test_stale_bridge_sockets_of_a_killed_server_do_not_block_clients(reactor, tmp_path):
    """Regression: a server killed with a fixed --runtime-dir left ``1.sock``...;
    the restarted server sent Welcome, then failed to bridge, and never listed
    the client."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "1.sock").write_text("left by a killed server")
    s = Stack(reactor, tmp_path)
    try:
        await s.connected_client("after-crash")
        result = await s.invoke("Unary", b"x", (("client-id", "after-crash"),))
        assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"x"])
    finally:
        await s.stop()
