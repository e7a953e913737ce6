"""Cluster mode's costs (issue 13): the extra hop, registration at scale, Watch latency.

    python3 benchmarks/cluster_bench.py                    # the issue's sizes
    python3 benchmarks/cluster_bench.py --clients 3000 --duration 2 --watch-samples 5

Starts one real etcd member (Debian's etcd-server, ``tests/etcd_cluster.py``) and
three ``twistd grpcmux-server`` nodes (a, b, c) on it, on loopback, and measures:

- *hop*: the Go echo backend (``go/echobackend``) behind one ``twistd grpcmux-client``
  (id ``bench``) held by node a; the Go load generator (``go/loadgen``, a fresh process
  per measurement, unary calls of 100 bytes) calls it through a's proxy endpoint (the
  owner) and through b's (a non-owner: b forwards over its node-to-node connection to
  a's cluster listener), alternating, ``--runs`` rounds; medians and the ratio
  non-owner/owner of calls/s, at 1 and at 32 calls in flight;
- *registration*: ``--clients`` clients in three swarm processes
  (``tests/reliability_kit/swarm.py``), a third on each node, all started at once;
  the time until every node's Discovery lists every one of them (each claimed in
  etcd and seen by every node's watch), then the RSS of etcd and of each node;
- *watch*: ``--watch-samples`` times, one more ``twistd grpcmux-client`` connects
  to node a through a relay that holds its TCP connection until it is made; the
  time from the relay's release (the handshake starts) to the CONNECTED event of a
  Discovery Watch on node c (and, for comparison, on a itself), both watched from
  this process (one clock), after one unmeasured client (the Watches open with a
  replay of every id listed).

Both Go programs are built by ``tests/interop/gobuild.py`` from Debian's packages.
Prints a table; ``--json`` prints everything measured instead.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402

from _procs import BenchError, Child  # noqa: E402
from interop import gobuild  # noqa: E402
from reliability_kit.cluster import ClusterScene  # noqa: E402
from reliability_kit.discovery import CONNECTED, list_servers  # noqa: E402
from reliability_kit.processes import (  # noqa: E402
    client_admitted, kit_script, mux_client, proc_resources)
from reliability_kit.relay import Relay  # noqa: E402
from rpc_backend import in_thread  # noqa: E402

CLIENT_ID = "bench"
TIMEOUT = 60.0
# Clients and nodes keep the default-ish keepalive here: 1 s pings to 10,000
# clients would measure the pings.
KEEPALIVE = (30.0, 10.0)
LIST_LIMIT = 60.0  # seconds after every client was admitted for every node to list all
HOP_SCENARIOS = {"unary_c1": 1, "unary_c32": 32}


class GoBackend:
    """The Go echo backend (grpcmux.v1.BenchService) the load generator calls."""

    def __init__(self, program):
        self.child = Child("echobackend", [program])
        line = self.child.read_until(lambda l: l.startswith("listening "), TIMEOUT)
        self.address = f"127.0.0.1:{line.split()[1]}"

    def stop(self):
        self.child.stop()


def loadgen(program, target, concurrency, duration, warmup):
    """One measurement (blocking, run in a thread): the load generator's JSON result."""
    argv = [program, "-target", target, "-client-id", CLIENT_ID, "-kind", "unary",
            "-concurrency", str(concurrency), "-size", "100",
            "-duration", f"{duration}s", "-warmup", f"{warmup}s"]
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=duration + warmup + TIMEOUT, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"loadgen exit {done.returncode}: {done.stderr.strip()[-500:]}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise BenchError(f"loadgen: {result['error']}")
    return result


async def measure_hop(reactor, scene, nodes, programs, args):
    backend = GoBackend(programs["echobackend"])
    scene.closers.append(backend.stop)
    owner, other = nodes[0], nodes[1]
    client = scene.track(mux_client(reactor, CLIENT_ID, owner.multiplexer_address,
                                    backend.address, KEEPALIVE))
    await client_admitted(client)
    listed, _ = await _listed_everywhere(reactor, [other], {CLIENT_ID}, TIMEOUT)
    if listed is None:
        raise BenchError(f"node {other.name} does not list {CLIENT_ID} after {TIMEOUT} s")
    targets = {"owner": owner.proxy_address, "non_owner": other.proxy_address}
    out = {}
    for name, concurrency in HOP_SCENARIOS.items():
        runs = {mode: [] for mode in targets}
        for run in range(args.runs):
            order = list(targets) if run % 2 == 0 else list(reversed(targets))
            for mode in order:
                result = await in_thread(reactor, loadgen, programs["loadgen"],
                                         targets[mode], concurrency, args.duration,
                                         args.warmup)
                runs[mode].append(result)
        entry = {mode: {"calls_per_s": statistics.median(r["calls_per_s"] for r in rs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                        "runs": rs} for mode, rs in runs.items()}
        entry["ratio"] = entry["non_owner"]["calls_per_s"] / entry["owner"]["calls_per_s"]
        out[name] = entry
    return out


async def _listed_everywhere(reactor, nodes, ids, limit):
    """Seconds until every node's List holds all of ``ids`` (polled, bounded), and
    how many of them each node lists by then (or at ``limit``)."""
    started = time.monotonic()
    counts = {}
    pending = list(nodes)
    while pending:
        listed = set(await in_thread(reactor, list_servers, pending[0].proxy_address))
        counts[pending[0].name] = len(ids & listed)
        if ids <= listed:
            pending.pop(0)
            continue
        if time.monotonic() - started > limit:
            for node in pending[1:]:
                listed = set(await in_thread(reactor, list_servers, node.proxy_address))
                counts[node.name] = len(ids & listed)
            return None, counts
        await deferLater(reactor, 0.1)
    return time.monotonic() - started, counts


async def measure_registration(reactor, scene, nodes, count, backend):
    shares = [count // len(nodes) + (i < count % len(nodes)) for i in range(len(nodes))]
    ids = {f"reg{i}-{n}" for i, share in enumerate(shares) for n in range(share)}
    started = time.monotonic()
    swarms = [scene.track(kit_script(reactor, f"swarm {node.name}", "swarm", "hold",
                                     "--count", share, "--prefix", f"reg{i}",
                                     "--multiplexer", node.multiplexer_address,
                                     "--backend", backend))
              for i, (node, share) in enumerate(zip(nodes, shares)) if share]
    admitted = [await swarm.wait_for(lambda e: e.get("event") == "admitted",
                                     timeout=max(TIMEOUT, count / 10)) for swarm in swarms]
    admitted_s = time.monotonic() - started
    listed, counts = await _listed_everywhere(reactor, nodes, ids, LIST_LIMIT)
    return {
        "clients": count,
        "admitted_s": admitted_s,
        "swarm_admitted_s": max(event["seconds"] for event in admitted),
        # None: some node still missed some after LIST_LIMIT s (counts say how many)
        "listed_everywhere_s": None if listed is None else admitted_s + listed,
        "listed_per_node": counts,
        "etcd_rss_kib": proc_resources(scene.etcd.members[0].process.pid)["rss"] // 1024,
        "node_rss_kib": {node.name: node.resources()["rss"] // 1024 for node in nodes},
    }


async def measure_watch(reactor, scene, nodes, samples, backend):
    """Each client dials node a through a relay that holds its connection until it
    is made, so its handshake starts at a known moment (``release``)."""
    near, far = nodes[0], nodes[2]
    watches = [scene.watcher(near), scene.watcher(far)]
    local, remote = [], []
    for n in range(-1, samples):  # sample -1 warms up (the Watches' replay of every id)
        client_id = f"watch-{n}"
        relay = Relay(reactor, "127.0.0.1", near.multiplexer_port)
        relay.hold()
        accepted = relay.when_accepted()
        child = scene.track(mux_client(reactor, client_id, relay.address, backend,
                                       KEEPALIVE))
        await accepted
        relay.release()
        started = time.monotonic()
        on_a, on_c = [await w.next(client_id, CONNECTED) for w in watches]
        if n >= 0:
            local.append(on_a[0] - started)
            remote.append(on_c[0] - started)
        await child.stop()
        await relay.close()
    return {"samples": samples,
            "on_other_node_median_ms": statistics.median(remote) * 1000,
            "on_other_node_max_ms": max(remote) * 1000,
            "on_own_node_median_ms": statistics.median(local) * 1000,
            "on_other_node_ms": [x * 1000 for x in remote]}


async def run(reactor, args, programs):
    try:
        report = await measure(reactor, args, programs)
    except BenchError as error:
        print(f"cluster_bench: {error}", file=sys.stderr)
        raise SystemExit(1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)


async def measure(reactor, args, programs):
    with tempfile.TemporaryDirectory(prefix="grpcmux-cluster-bench-") as workdir:
        async with ClusterScene(reactor, Path(workdir)) as scene:
            nodes = [await scene.node(name, keepalive=KEEPALIVE) for name in "abc"]
            python_backend = await scene.backend()
            report = {"nodes": len(nodes), "etcd_members": 1}
            report["hop"] = await measure_hop(reactor, scene, nodes, programs, args)
            if args.logs:
                scene.closers.append(lambda: write_logs(Path(args.logs), nodes))
            report["registration"] = await measure_registration(
                reactor, scene, nodes, args.clients, python_backend.address)
            report["watch"] = await measure_watch(reactor, scene, nodes, args.watch_samples,
                                                  python_backend.address)
    return report


def write_logs(directory, nodes):
    """Each node's JSON log lines, to ``directory/<node>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        with open(directory / f"{node.name}.json", "w") as f:
            for event in node.child.events:
                f.write(json.dumps(event, default=str) + "\n")


def print_table(report):
    rows = []
    for name, entry in report["hop"].items():
        rows.append((f"hop {name}", f"owner {entry['owner']['calls_per_s']:.0f} calls/s, "
                     f"non-owner {entry['non_owner']['calls_per_s']:.0f} calls/s",
                     f"ratio {entry['ratio']:.2f}x"))
    reg = report["registration"]
    nodes_rss = ", ".join(f"{n} {kib / 1024:.0f}" for n, kib in reg["node_rss_kib"].items())
    if reg["listed_everywhere_s"] is None:
        listed = "NOT listed everywhere: " + ", ".join(
            f"{n} {c}" for n, c in reg["listed_per_node"].items())
    else:
        listed = f"listed on 3 nodes {reg['listed_everywhere_s']:.1f} s"
    rows.append((f"register {reg['clients']} clients",
                 f"admitted {reg['admitted_s']:.1f} s, {listed}",
                 f"etcd {reg['etcd_rss_kib'] / 1024:.0f} MiB; nodes {nodes_rss} MiB"))
    watch = report["watch"]
    rows.append((f"watch: connect to a, event on c ({watch['samples']}x)",
                 f"median {watch['on_other_node_median_ms']:.1f} ms, "
                 f"max {watch['on_other_node_max_ms']:.1f} ms",
                 f"(event on a itself: median {watch['on_own_node_median_ms']:.1f} ms)"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    line = "  ".join("=" * w for w in widths)
    print(line)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000,
                        help="clients registering across the 3 nodes (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of the hop measurement")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds measured per load generator run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--watch-samples", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    parser.add_argument("--logs", metavar="DIR",
                        help="write each node's JSON log to DIR/<node>.json at the end")
    args = parser.parse_args()
    if min(args.clients, args.runs, args.watch_samples) < 1 or args.duration <= 0:
        sys.exit("cluster_bench: --clients, --runs and --watch-samples must be >= 1, "
                 "--duration > 0")
    try:
        programs = {name: gobuild.build(name) for name in ("echobackend", "loadgen")}
    except gobuild.GoBuildError as error:
        sys.exit(f"cluster_bench: cannot build the Go programs: {error}")
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args, programs)))


if __name__ == "__main__":
    main()
