"""Load and resource bounds with real processes on loopback (issue 6).

The scenarios live in ``tests/reliability_kit/scenarios.py`` (shared with
``benchmarks/reliability.py``).  Memory is the RSS of the server and client
processes (``/proc/<pid>/status``); every byte of every stream is compared with
what was sent and hashed.  Resource baselines are taken after a warm-up, so
one-time allocations (grpc's channel machinery, the first client) are not
counted as leaks.
"""

import pytest
import pytest_twisted

from reliability_kit import scenarios
from reliability_kit.scenarios import GIB, MIB

# Enough calls for a leak of a few bytes per call to stand out; a run takes minutes.
CHURN_CALLS = 100000


# grpcio's thread pools start a thread on demand when the machine is busy, and a
# process has about ten: one more is not a leak (a leak over 100,000 calls or
# 5,000 connections would be thousands).
SPARE_THREADS = 2


def assert_near_baseline(baseline, after):
    for name in ("rss", "fds"):
        assert 0.9 <= after[name] / baseline[name] <= 1.1, (name, baseline, after)
    assert baseline["threads"] - SPARE_THREADS <= after["threads"] \
        <= baseline["threads"] + SPARE_THREADS, (baseline, after)


@pytest_twisted.ensureDeferred
async def test_a_thousand_clients_listed_and_each_callable(reactor, tmp_path):
    figures = await scenarios.many_clients(reactor, tmp_path, count=1000)
    assert (figures["listed"], figures["listed_exactly"]) == (1000, True)
    assert (figures["calls_ok"], figures["failures"]) == (1000, {})


@pytest_twisted.ensureDeferred
async def test_a_thousand_concurrent_streams_through_one_client(reactor, tmp_path):
    figures = await scenarios.many_streams(reactor, tmp_path, count=1000, messages=4,
                                           size=4096)
    assert (figures["calls_ok"], figures["failures"]) == (1000, {})
    assert figures["bytes_checked"] == 1000 * 4 * 4096


@pytest_twisted.ensureDeferred
async def test_slow_reader_holds_the_backend_back_within_32_mib(reactor, tmp_path):
    figures = await scenarios.backpressure(reactor, tmp_path, total=GIB, read=256 * MIB,
                                           rate=MIB, slow_seconds=4.0)
    assert figures["slow_read_rate_mib_s"] <= 1.1
    assert figures["slow_server_extra_mib"] < 32
    assert figures["slow_client_extra_mib"] < 32
    # Held back: of the GiB asked for, the backend got out only what the caller
    # read plus what the buffers on the way hold.
    assert figures["slow_held_back_mib"] < 32
    assert figures["received_mib"] >= 256
    assert figures["hash_ok"]
    assert figures["status"] == "CANCELLED"  # the caller stopped after 256 MiB


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_connect_disconnect_churn_leaves_the_server_at_baseline(reactor, tmp_path):
    figures = await scenarios.churn_connections(reactor, tmp_path, cycles=5000)
    assert (figures["failed"], figures["errors"]) == (0, [])
    assert_near_baseline(figures["baseline"], figures["after"])
    assert figures["after"]["runtime_sockets"] == figures["baseline"]["runtime_sockets"] == 1


@pytest.mark.timeout(900)
@pytest_twisted.ensureDeferred
async def test_proxied_calls_churn_leaves_server_and_client_at_baseline(reactor, tmp_path):
    figures = await scenarios.churn_calls(reactor, tmp_path, calls=CHURN_CALLS)
    assert (figures["calls_ok"], figures["calls_failed"]) == (CHURN_CALLS, 0)
    assert_near_baseline(figures["baseline"], figures["after"])
    assert figures["after"]["runtime_sockets"] == figures["baseline"]["runtime_sockets"] == 1
    assert_near_baseline(figures["client_baseline"], figures["client_after"])
