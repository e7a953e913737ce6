"""benchmarks/cluster_bench.py runs end to end at tiny sizes, so it cannot rot.

It asserts what the harness produces (the hop through owner and non-owner, the
registration and memory figures, the Watch latency), never how fast anything is.
Real etcd, real twistd nodes, the Go load generator built from Debian's packages.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "cluster_bench.py"
TINY = ["--clients", "7", "--runs", "1", "--duration", "0.2", "--warmup", "0.05",
        "--watch-samples", "2"]
# A cold Go build (grpc-go included) takes a minute or more on a busy 2-core machine.
TIMEOUT = 400
pytestmark = pytest.mark.timeout(TIMEOUT)


def run_bench(*argv):
    return subprocess.run([sys.executable, str(BENCH), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT - 20)


def test_tiny_run_reports_the_hop_registration_and_watch_latency():
    done = run_bench(*TINY, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["nodes"], report["etcd_members"]) == (3, 1)
    assert set(report["hop"]) == {"unary_c1", "unary_c32"}
    for name, entry in report["hop"].items():
        for mode in ("owner", "non_owner"):
            assert entry[mode]["runs"][0]["calls"] > 0, (name, mode)
            assert entry[mode]["calls_per_s"] > 0, (name, mode)
        assert entry["ratio"] == entry["non_owner"]["calls_per_s"] / entry["owner"][
            "calls_per_s"]
    registration = report["registration"]
    assert registration["clients"] == 7
    assert 0 < registration["admitted_s"] <= registration["listed_everywhere_s"]
    assert registration["listed_per_node"] == {"a": 7, "b": 7, "c": 7}
    assert registration["etcd_rss_kib"] > 0
    assert sorted(registration["node_rss_kib"]) == ["a", "b", "c"]
    assert all(kib > 0 for kib in registration["node_rss_kib"].values())
    watch = report["watch"]
    assert watch["samples"] == 2 and len(watch["on_other_node_ms"]) == 2
    assert 0 < watch["on_other_node_median_ms"] <= watch["on_other_node_max_ms"]


def test_the_table_has_one_row_per_figure():
    done = run_bench(*TINY)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line and not line.startswith("=")]
    assert [row.split("  ")[0] for row in rows] == [
        "hop unary_c1", "hop unary_c32", "register 7 clients",
        "watch: connect to a, event on c (2x)"]
    assert "ratio" in rows[0] and "etcd" in rows[2] and "median" in rows[3]


def test_bad_sizes_are_refused_in_one_line():
    done = run_bench("--clients", "0")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "cluster_bench: --clients, --runs and --watch-samples must be >= 1, --duration > 0"]
