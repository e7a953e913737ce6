"""The benchmark suite runs end to end at tiny sizes, so it cannot rot.

It asserts what the harness produces (every scenario, direct, proxied and through the
Go original, the CPU and memory figures), never how fast anything is.  The Go
programs are built from Debian's packages; one that cannot be built fails the test.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from grpcmux._proto.grpcmux.v1 import bench_pb2, bench_pb2_grpc
from interop import gobuild
from interop.peers import Peer

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "grpc_bench.py"
SCENARIOS = {"unary_c1", "unary_c32", "server_stream", "client_stream", "bidi_pingpong"}
TINY = ["--runs", "1", "--duration", "0.2", "--warmup", "0.05", "--stream-count", "2",
        "--stream-size", "4096", "--cpu-rate", "100", "--cpu-duration", "0.3"]
# A cold Go build (grpc-go included) takes a minute or more on a busy 2-core machine.
BUILD_TIMEOUT = 400
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT)


def run_bench(*argv, timeout=BUILD_TIMEOUT - 20, env=None):
    return subprocess.run([sys.executable, str(BENCH), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def processes_with_environment(entry):
    """Running processes whose environment holds ``entry`` (``NAME=value``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry.encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass  # gone meanwhile, or not ours
    return found


def test_tiny_run_reports_every_scenario_in_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench(*TINY, "--idle-clients", "1,3", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["modes"] == ["direct", "proxied", "go", "relays"]
    assert set(report["throughput"]) == SCENARIOS
    for name, entry in report["throughput"].items():
        metric = entry["metric"]
        for mode in ("direct", "proxied", "go", "relays"):
            assert entry[mode]["runs"][0]["calls"] > 0, (name, mode)
            assert entry[mode][metric] > 0, (name, mode)
            assert entry[mode]["p50_ms"] <= entry[mode]["p99_ms"], (name, mode)
        for mode in ("proxied", "go", "relays"):
            assert entry[f"{mode}_ratio"] == entry[mode][metric] / entry["direct"][metric]
        assert isinstance(entry["meets_target"], bool)
    for name in ("server_stream", "client_stream"):  # payload bytes, both directions
        run = report["throughput"][name]["proxied"]["runs"][0]
        assert run["bytes"] == run["calls"] * 2 * 4096, name
    cpu = report["cpu"]
    assert set(cpu["direct"]) >= {"backend_ms_per_call", "caller_ms_per_call"}
    assert set(cpu["proxied"]) >= {"server_ms_per_call", "client_ms_per_call",
                                   "caller_ms_per_call"}
    assert set(cpu["go"]) >= {"go_server_ms_per_call", "go_client_ms_per_call"}
    assert set(cpu["relays"]) >= {"relay_1_ms_per_call", "relay_2_ms_per_call"}
    for mode in ("direct", "proxied", "go", "relays"):
        assert cpu[mode]["ms_per_call"] >= 0 and cpu[mode]["caller_ms_per_call"] > 0
    levels = report["memory"]["levels"]
    assert [(level["clients"], level["listed"]) for level in levels] == [(1, 1), (3, 3)]
    assert all(level["server_rss_kib"] > 0 for level in levels)
    assert "kib_per_idle_client" in report["memory"]
    header = done.stdout.splitlines()[0].split()
    assert header[:6] == ["scenario", "metric", "direct", "proxied", "ratio", "target"]
    assert header[6:] == ["Go", "original", "ratio", "2", "Go", "relays", "ratio"]
    for name in SCENARIOS:
        assert name in done.stdout  # the table
    assert "Traceback" not in done.stderr


def test_a_failed_start_is_one_line_and_leaves_no_process(tmp_path):
    # The backend (started first) must not outlive a server that cannot start: no
    # process with the run's environment is left.
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRPCMUX_GO_CACHE": str(gobuild.cache_dir())}
    done = run_bench("--server-arg=--no-such-flag", "--json", str(tmp_path / "x.json"), env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("grpc_bench: grpcmux-server: output ended")
    assert "Traceback" not in done.stderr
    assert processes_with_environment(f"TMPDIR={tmp_path}") == []


def test_a_missing_go_toolchain_fails_in_one_line(tmp_path):
    done = run_bench("--json", str(tmp_path / "x.json"), timeout=60,
                     env={**os.environ, "PATH": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.startswith("grpc_bench: cannot build the Go programs: "
                                  "the Go toolchain is missing: apt-get install golang-go")
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_option_is_one_line(tmp_path):
    done = run_bench("--idle-clients", "many", "--json", str(tmp_path / "x.json"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "--idle-clients: expected comma-separated counts, got 'many'")
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def go_backend():
    """The Go echo backend, running; yields its address."""
    with Peer([gobuild.build("echobackend")], stdin=subprocess.PIPE) as backend:
        port = backend.read_line(timeout=BUILD_TIMEOUT).split()[1]
        yield f"127.0.0.1:{port}"
        backend.process.stdin.close()  # its signal to end
        assert backend.wait(15) == 0, backend.describe()


def test_the_go_backend_answers_bench_proto_as_generated_code_speaks_it(go_backend):
    # grpcio with bench_pb2 against the hand-coded Go messages: every method and field.
    with grpc.insecure_channel(go_backend) as channel:
        stub = bench_pb2_grpc.BenchServiceStub(channel)
        request = bench_pb2.EchoRequest(payload=b"\x00ping\xff" * 50)
        assert stub.Unary(request, timeout=15).payload == request.payload
        replies = list(stub.ServerStream(bench_pb2.EchoRequest(count=3, size=70000), timeout=15))
        assert [reply.payload for reply in replies] == [b"x" * 70000] * 3
        assert list(stub.ServerStream(bench_pb2.EchoRequest(count=0, size=5), timeout=15)) == []
        sizes = [0, 1, 127, 128, 300000]
        reply = stub.ClientStream(iter(bench_pb2.EchoRequest(payload=b"c" * n) for n in sizes),
                                  timeout=15)
        assert reply.received == sum(sizes) and reply.payload == b""
        pings = [bench_pb2.EchoRequest(payload=bytes([i]) * (i + 1)) for i in range(5)]
        assert [r.payload for r in stub.Bidi(iter(pings), timeout=15)] == \
            [p.payload for p in pings]


@pytest.mark.parametrize("kind", ["unary", "server_stream", "client_stream", "bidi"])
def test_the_go_load_generator_counts_calls_and_bytes(go_backend, kind):
    done = subprocess.run([gobuild.build("loadgen"), "-target", go_backend, "-kind", kind,
                           "-calls", "20", "-concurrency", "3", "-warmup", "0", "-size", "1000",
                           "-messages", "4", "-client-id", "ignored-directly"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    per_call = 4000 if kind.endswith("stream") else 1000
    assert (result["kind"], result["calls"], result["bytes"]) == (kind, 20, 20 * per_call)
    assert result["calls_per_s"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]


def test_the_go_load_generator_reports_a_failed_call_as_json():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([gobuild.build("loadgen"), "-target", f"127.0.0.1:{port}",
                           "-timeout", "0.5s"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"].startswith(f"cannot connect to 127.0.0.1:{port}")


@pytest.mark.parametrize("argv,message", [
    (["-target", "x:1", "-kind", "nope"], "-kind: expected unary, server_stream, "
                                          "client_stream or bidi, got \"nope\""),
    (["-target", "x:1", "-kind", "bidi", "-rate", "10"], "-rate works with unary, "
                                                         "server_stream and client_stream "
                                                         "calls, not bidi"),
    (["-concurrency", "x"], "invalid value \"x\" for flag -concurrency: parse error"),
    ([], "-target HOST:PORT is required"),
])
def test_the_go_load_generator_rejects_bad_flags_in_one_line(argv, message):
    done = subprocess.run([gobuild.build("loadgen"), *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"loadgen: {message}\n"
    assert done.stdout == ""
