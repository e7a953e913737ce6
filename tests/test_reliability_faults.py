"""Faults with real processes on loopback (issue 6): every failure becomes a prompt,
clear gRPC status and a clean reconnect.

The scenarios live in ``tests/reliability_kit/scenarios.py`` (shared with
``benchmarks/reliability.py``); each returns its figures and these tests assert
the bounds the issue names.  Keepalive is (1 s interval, 1 s timeout) here;
``SLACK`` allows for process scheduling on a loaded CI machine.
"""

import socket

import grpc
import pytest
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


def assert_held_calls_failed_cleanly(figures, client_id):
    assert figures["codes"] == ["UNAVAILABLE"]
    assert figures["details_name_client"], client_id
    assert figures["echo_errors"] == []


@pytest.mark.parametrize("scenario", ["client_frozen", "link_blackholed"])
@pytest_twisted.ensureDeferred
async def test_dead_link_is_detected_by_keepalive_and_the_client_comes_back(
        reactor, tmp_path, scenario):
    figures = await getattr(scenarios, scenario)(reactor, tmp_path)
    bound = figures["bound_s"] + SLACK  # keepalive interval + timeout
    assert figures["detected_s"] <= bound
    assert figures["failed_within_s"] <= bound  # the calls in flight did not hang
    assert_held_calls_failed_cleanly(figures, "edge-fault")
    if scenario == "link_blackholed":
        assert figures["client_detected_s"] <= bound  # the client noticed too
    # Back without any action: after SIGCONT the server's close is read at once;
    # through the relay, the client's attempt in progress is itself cut by its
    # keepalive, so one more interval + timeout, plus a backoff step.
    assert figures["reconnected_s"] <= bound + scenarios.backoff_bound(bound)
    assert figures["probe_after"]["ok_after_s"] < 5.0


@pytest_twisted.ensureDeferred
async def test_server_killed_and_restarted_clients_come_back_within_backoff(
        reactor, tmp_path):
    figures = await scenarios.server_restarted(reactor, tmp_path)
    assert figures["reconnected_max_s"] <= figures["backoff_bound_s"] + SLACK
    assert figures["listed_after"] == ["edge-0", "edge-1", "edge-2"]
    assert figures["callable_after_s"] <= figures["backoff_bound_s"] + 2 * SLACK


@pytest_twisted.ensureDeferred
async def test_backend_down_fails_fast_and_recovers_without_restarts(reactor, tmp_path):
    figures = await scenarios.backend_restarted(reactor, tmp_path)
    assert figures["ok_before"]
    assert figures["down_codes"] == ["UNAVAILABLE"]
    assert figures["down_details_name_client"]
    assert figures["down_slowest_s"] < 1.0  # fast, not the 2 s probe deadline
    assert figures["up_ok_after_s"] < 5.0


@pytest_twisted.ensureDeferred
async def test_duplicate_id_takes_over_an_undetected_dead_session(reactor, tmp_path):
    figures = await scenarios.duplicate_takeover(reactor, tmp_path)
    # Keepalive is 30 s here: only the duplicate check's ping can explain this.
    assert figures["ping_timeout_s"] <= figures["took_over_s"] <= figures["ping_timeout_s"] + SLACK
    assert figures["new_listed_s"] <= figures["ping_timeout_s"] + SLACK
    assert figures["probe"]["failed_first"] == 0


@pytest_twisted.ensureDeferred
async def test_a_stale_socket_of_a_killed_server_does_not_block_a_restart(reactor, tmp_path):
    """A server killed with a fixed --runtime-dir leaves its local services' socket;
    the next one removes it, binds its own and serves."""
    run = tmp_path / "run"
    run.mkdir()
    with socket.socket(socket.AF_UNIX) as left:  # a killed server leaves its socket file
        left.bind(str(run / "local.sock"))
    s = Stack(reactor, tmp_path)
    try:
        await s.connected_client("after-crash")
        result = await s.invoke("Unary", b"x", (("client-id", "after-crash"),))
        assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"x"])
    finally:
        await s.stop()
