"""grpc-js as the caller: Node's http2 stack in front of the router.

``grpcjs/client.js`` makes each call kind, metadata both ways, statuses and a
deadline through the proxy; this test starts the stack, runs it with Node and checks
what it printed. ``.ci/run`` installs its one dependency (``npm ci`` in grpcjs/).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest_twisted

HERE = Path(__file__).resolve().parent / "grpcjs"


def run_node(port, client_id):
    node = shutil.which("node")
    assert node, "node is not installed (Debian's nodejs; .ci/run installs it)"
    assert (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        f"grpc-js is not installed: npm ci --prefix {HERE}")
    done = subprocess.run([node, str(HERE / "client.js"), str(port), client_id],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {case["case"]: case for case in map(json.loads, done.stdout.splitlines())}


@pytest_twisted.ensureDeferred
async def test_grpcjs_calls_through_the_router(stack):
    await stack.connected_client("lab")
    cases = await stack.in_thread(run_node, stack.proxy.port, "lab")
    unary = cases["unary"]
    assert (unary["code"], unary["reply"]) == ("OK", "ping")
    assert unary["headers"]["h"] == "v" and unary["trailers"]["t"] == "w", unary
    assert cases["server_stream"] == {"case": "server_stream", "code": "OK",
                                      "replies": [70000] * 3}
    assert (cases["client_stream"]["code"], cases["client_stream"]["reply"]) == ("OK", "a|b|c")
    assert cases["bidi"]["echoed"] == ["x", "y"]
    assert (cases["backend_status"]["code"], cases["backend_status"]["details"]) == (
        "NOT_FOUND", "nope")
    assert (cases["unknown_client"]["code"], cases["unknown_client"]["details"]) == (
        "NOT_FOUND", "client 'nobody' is not connected")
    assert cases["deadline"]["code"] == "DEADLINE_EXCEEDED"
