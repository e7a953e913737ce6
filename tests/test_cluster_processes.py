"""Cluster failures with real processes (issue 13): two ``twistd grpcmux-server``
nodes on one real etcd member, a ``twistd grpcmux-client`` given both addresses.

The scenarios are in ``tests/reliability_kit/cluster.py``. Bounds: a dead node's
lease expires within its TTL (5 s); the client's next attempt after that comes
within its backoff (``scenarios.backoff_bound``); ``SLACK`` allows for
scheduling on a loaded machine.
"""

import pytest_twisted

from reliability_kit import cluster
from reliability_kit.scenarios import backoff_bound

SLACK = 1.5


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_clients_node_moves_it_to_the_other_node(reactor, tmp_path):
    figures = await cluster.node_killed(reactor, tmp_path)
    assert figures["forwarded_before"], figures  # a call through the non-owner worked
    assert figures["disconnected_s"] <= cluster.TTL + SLACK, figures
    # Refused (ALREADY_EXISTS, a live lease) until the lease expired, then admitted
    # within the backoff it had reached by then.
    assert figures["reconnected_s"] <= (cluster.TTL + backoff_bound(cluster.TTL)
                                        + SLACK), figures
    assert figures["watch_events"] == ["DISCONNECTED", "CONNECTED"], figures
    assert figures["callable_after_s"] < 5.0, figures
    assert figures["listed_after"] == ["edge-cluster-kill"], figures


@pytest_twisted.ensureDeferred
async def test_sigterm_of_the_clients_node_lets_forwarded_calls_finish(reactor, tmp_path):
    figures = await cluster.node_stopped(reactor, tmp_path)
    assert figures["codes"] == ["OK"], figures
    assert figures["echo_errors"] == [], figures
    assert figures["bytes_checked"] == figures["bytes_expected"], figures
    assert not figures["moved_before_calls_ended"], figures
    assert figures["watch_events"] == ["DISCONNECTED", "CONNECTED"], figures
    assert figures["reconnected_after_calls_s"] <= backoff_bound(0) + cluster.TTL, figures
    assert figures["holder_exit_code"] == 0, figures
    assert figures["callable_after_s"] < 5.0, figures
    assert figures["listed_after"] == ["edge-cluster-stop"], figures
