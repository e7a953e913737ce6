"""The benchmark suite runs end to end at tiny sizes, so it cannot rot.

It asserts what the harness produces (every scenario, direct and proxied, the CPU
and memory figures), never how fast anything is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "grpc_bench.py"
SCENARIOS = {"unary_c1", "unary_c32", "server_stream", "client_stream", "bidi_pingpong"}


def run_bench(*argv, timeout=100, env=None):
    return subprocess.run([sys.executable, str(BENCH), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def processes_mentioning(text):
    """Running processes whose command line contains ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def test_tiny_run_reports_every_scenario_direct_and_proxied(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--runs", "1", "--duration", "0.2", "--warmup", "0.05",
                     "--stream-count", "2", "--stream-size", "4096", "--cpu-rate", "100",
                     "--cpu-duration", "0.3", "--idle-clients", "1,3", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert set(report["throughput"]) == SCENARIOS
    for name, entry in report["throughput"].items():
        for mode in ("direct", "proxied"):
            assert entry[mode]["runs"][0]["calls"] > 0, (name, mode)
            assert entry[mode][entry["metric"]] > 0, (name, mode)
        assert entry["ratio"] == entry["proxied"][entry["metric"]] / entry["direct"][entry["metric"]]
    for mode in ("direct", "proxied"):
        assert report["cpu"][mode]["ms_per_call"] >= 0
    assert set(report["cpu"]["proxied"]) >= {"server_ms_per_call", "client_ms_per_call",
                                             "caller_ms_per_call"}
    assert "stage" not in report["processes"] and "stage" not in report["cpu"]
    levels = report["memory"]["levels"]
    assert [(level["clients"], level["listed"]) for level in levels] == [(1, 1), (3, 3)]
    assert all(level["server_rss_kib"] > 0 for level in levels)
    assert "kib_per_idle_client" in report["memory"]
    for name in SCENARIOS:
        assert name in done.stdout  # the table
    assert "Traceback" not in done.stderr


def test_stage_adds_the_proxy_stage_alone_to_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--stage", "--runs", "2", "--duration", "0.2", "--warmup", "0.05",
                     "--scenario", "unary_c1", "--scenario", "server_stream",
                     "--stream-count", "2", "--stream-size", "4096", "--cpu-rate", "100",
                     "--cpu-duration", "0.3", "--idle-clients", "", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert "stage" in report["processes"]
    for name, entry in report["throughput"].items():
        metric = entry["metric"]
        assert [run["calls"] > 0 for run in entry["stage"]["runs"]] == [True, True], name
        assert entry["stage_ratio"] == entry["stage"][metric] / entry["direct"][metric]
    assert set(report["cpu"]["stage"]) >= {"stage_ms_per_call", "caller_ms_per_call"}
    header = done.stdout.splitlines()[0].split()
    assert header[-2:] == ["stage", "ratio"]
    assert "Traceback" not in done.stderr


def test_a_failed_start_is_one_line_and_leaves_no_process(tmp_path):
    # The backend (started first; its socket lives in the work directory, under
    # TMPDIR) must not outlive a server that cannot start.
    done = run_bench("--server-arg=--no-such-flag", "--json", str(tmp_path / "x.json"),
                     env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.startswith("grpc_bench: grpcmux-server: output ended")
    assert "Traceback" not in done.stderr
    assert processes_mentioning(str(tmp_path)) == []


def test_bad_option_is_one_line(tmp_path):
    done = run_bench("--idle-clients", "many", "--json", str(tmp_path / "x.json"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "--idle-clients: expected comma-separated counts, got 'many'")
    assert "Traceback" not in done.stderr
