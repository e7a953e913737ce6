"""grpcmux.malloc: fixed glibc thresholds stop the page faults of 256 KiB buffer churn."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpcmux import malloc

ROOT = Path(__file__).resolve().parent.parent

# Allocates and frees 256 KiB buffers the way a tunnel does (three alive at a
# time), and prints tune_malloc()'s answer and the minor page faults it took.
CHURN = """
import json, resource, sys
from grpcmux.malloc import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):
    a = bytearray(262144); b = bytearray(262144); c = bytearray(262144)
    del a, b, c
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def churn(mode, **env):
    done = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_fixed_thresholds_stop_the_page_faults_of_buffer_churn():
    untouched = churn("leave")
    tuned = churn("tune")
    assert tuned["tuned"] is True
    # 1,500 buffers of 64 pages each: glibc's own thresholds fault in most of them
    # again; fixed ones reuse the heap.
    assert untouched["faults"] > 20000, untouched
    assert tuned["faults"] < 2000, tuned


@pytest.mark.parametrize("env", [
    {"MALLOC_TRIM_THRESHOLD_": "1048576"},
    {"MALLOC_MMAP_THRESHOLD_": "1048576"},
    {"MALLOC_TOP_PAD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
])
def test_operator_malloc_settings_are_left_alone(env):
    assert churn("tune", **env)["tuned"] is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert malloc.tune_malloc(environ={}) is False


def test_unrelated_tunables_do_not_stop_the_tuning():
    assert churn("tune", GLIBC_TUNABLES="glibc.pthread.rseq=0")["tuned"] is True
