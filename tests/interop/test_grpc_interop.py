"""The official gRPC interop cases, grpc-go on both ends, through the HTTP/2 router.

``grpcinterop/server`` (grpc.testing.TestService) sits behind a multiplexer client;
``grpcinterop/client`` calls it through the proxy with ``client-id: interop`` and
prints ``PASS name`` or ``FAIL name: why`` per case. Both are built from Debian's
golang-google-grpc-dev (``gobuild``); a build problem fails these tests.
"""

import subprocess

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from peers import Peer

CASES = [
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "unimplemented_method",
    "unimplemented_service",
]
CLIENT_TIMEOUT = 25.0  # below stack.in_thread's wait, so the process is killed first
CONCURRENT_CALLERS = 4


@pytest.fixture(scope="module")
def interop_server(go_program):
    """The Go TestService on 127.0.0.1; yields its HOST:PORT."""
    with Peer([go_program("interopserver"), "-listen", "127.0.0.1:0"]) as server:
        line = server.read_until(lambda text: text.startswith("listening "), timeout=15.0)
        yield line.split()[1]


@pytest.fixture(scope="module")
def interop_client(go_program):
    return go_program("interopclient")


def run_client(program, port, client_id, test_case="all"):
    """Run the Go client through the proxy: ({case: "PASS" or the FAIL line}, exit, stderr)."""
    done = subprocess.run(
        [str(program), "-server_addr", f"127.0.0.1:{port}", "-test_case", test_case,
         "-metadata", f"client-id:{client_id}"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )
    results = {}
    for line in done.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        name = rest.split(":", 1)[0]
        assert verdict in ("PASS", "FAIL") and name in CASES, f"unexpected output {line!r}"
        results[name] = "PASS" if verdict == "PASS" else line
    return results, done.returncode, done.stderr


async def run_through_proxy(stack, program, server_address, wire_protocol, test_case="all"):
    await stack.connected_client("interop", backend_address=server_address,
                                 wire_protocol=wire_protocol)
    return await stack.in_thread(run_client, program, stack.proxy.port, "interop", test_case)


@pytest.mark.parametrize("case", CASES)
@pytest_twisted.ensureDeferred
async def test_interop_case_native(stack, interop_server, interop_client, case):
    results, code, stderr = await run_through_proxy(
        stack, interop_client, interop_server, "native", case)
    assert results == {case: "PASS"}, stderr
    assert code == 0, stderr


@pytest_twisted.ensureDeferred
async def test_interop_all_cases_legacy(stack, interop_server, interop_client):
    """Every case once through a legacy client: the nested-session upstream."""
    results, code, stderr = await run_through_proxy(
        stack, interop_client, interop_server, "legacy")
    failed = [results.get(case, f"{case}: no result") for case in CASES
              if results.get(case) != "PASS"]
    assert not failed, "\n".join(failed) + "\n" + stderr
    assert code == 0, stderr


@pytest_twisted.ensureDeferred
async def test_interop_client_reports_failures(stack, interop_server, interop_client):
    """An unknown client id fails the cases with NOT_FOUND, and the exit status is 1.

    Two cases race their own deadline or cancellation against the router's answer,
    so either status may win there: they are only required to have run.
    """
    await stack.connected_client("interop", backend_address=interop_server)
    results, code, stderr = await stack.in_thread(
        run_client, interop_client, stack.proxy.port, "nobody")
    assert sorted(results) == sorted(CASES), stderr
    racing = {"timeout_on_sleeping_server", "cancel_after_begin"}
    for case in set(CASES) - racing:
        line = results[case]
        assert line.startswith(f"FAIL {case}: ") and "NotFound" in line, line
    assert code == 1


@pytest_twisted.ensureDeferred
async def test_interop_concurrent_callers_share_the_tunnel(stack, interop_server,
                                                           interop_client):
    """Four Go clients run every case at once through one native client's upstream."""
    await stack.connected_client("interop", backend_address=interop_server)
    runs = await DeferredList(
        [stack.in_thread(run_client, interop_client, stack.proxy.port, "interop")
         for _ in range(CONCURRENT_CALLERS)], fireOnOneErrback=True, consumeErrors=True)
    for index, (_, (results, code, stderr)) in enumerate(runs):
        failed = [results.get(case, f"{case}: no result") for case in CASES
                  if results.get(case) != "PASS"]
        assert not failed, f"caller {index}:\n" + "\n".join(failed) + "\n" + stderr
        assert code == 0, stderr
