"""Cluster faults with real processes: two ``twistd grpcmux-server`` nodes on one
real etcd member, and a ``twistd grpcmux-client`` given both nodes' addresses.

Each scenario returns its figures (seconds, ``time.monotonic`` in this process)
and the events seen; ``tests/test_cluster_processes.py`` asserts the bounds.
The node the client lands on is its choice (it starts at a random address): the
scenario reads it from the client's "connected to multiplexer" line.
"""

import time

from etcd_cluster import EtcdCluster, free_port
from grpcmux.cluster.registry import DEFAULT_TTL
from reliability_kit import callers
from reliability_kit.discovery import CONNECTED, DISCONNECTED
from reliability_kit.pattern import echo_payload
from reliability_kit.processes import MuxServer, client_admitted, mux_client
from reliability_kit.scenarios import KEEPALIVE, Scene, _probe_until_ok
from rpc_backend import in_thread

REGISTERED = "registered in etcd"
TTL = DEFAULT_TTL
AFTER_GO_AWAY = 4  # echo round trips of each call after the GoAway


class ClusterScene(Scene):
    """A Scene with one etcd member and nodes named after their work directories."""

    def __init__(self, reactor, workdir):
        super().__init__(reactor, workdir)
        self.etcd = EtcdCluster(workdir, members=1).start()
        self.token = workdir / "cluster.token"
        self.token.write_text("cluster-secret-0123456789\n")

    async def node(self, name, extra=(), keepalive=KEEPALIVE):
        workdir = self.workdir / name
        workdir.mkdir()
        server = MuxServer(self.reactor, workdir, keepalive, extra=(
            "--node-name", name, "--cluster-etcd", self.etcd.endpoints,
            "--cluster-token-file", self.token,
            "--cluster-listener", f"127.0.0.1:{free_port()}", *extra))
        await server.start()
        self.track(server.child)
        await server.child.wait_for_message(REGISTERED)
        server.name = name
        return server

    async def close(self):
        try:
            await super().close()
        finally:
            self.etcd.stop()


def _holder(admitted, nodes):
    """The node whose multiplexer address the client's admission line names."""
    for node in nodes:
        if node.multiplexer_address == admitted["address"]:
            return node
    raise AssertionError(f"client connected to {admitted['address']}, no node of ours")


def _kinds(watch, client_id, after):
    names = {CONNECTED: "CONNECTED", DISCONNECTED: "DISCONNECTED"}
    return [names.get(event, event) for when, server, event in watch.events
            if server == client_id and when >= after]


async def _two_nodes_and_a_client(scene, client_id, node_extra=()):
    backend = await scene.backend()
    nodes = [await scene.node("a", node_extra), await scene.node("b", node_extra)]
    watches = {node.name: scene.watcher(node) for node in nodes}
    addresses = ",".join(node.multiplexer_address for node in nodes)
    client = scene.track(mux_client(scene.reactor, client_id, addresses, backend.address,
                                    KEEPALIVE))
    admitted = await client_admitted(client)
    holder = _holder(admitted, nodes)
    other = nodes[1 - nodes.index(holder)]
    # Listed on the other node too (through etcd), and callable through it.
    await watches[other.name].next(client_id, CONNECTED)
    forwarded = await _probe_until_ok(scene.reactor, other, client_id)
    return client, holder, other, watches[other.name], forwarded


async def _moved(scene, client, client_id, other, watch, mark, since):
    """The client's reconnection to ``other`` after monotonic time ``since``."""
    back = await client_admitted(client, since=mark, timeout=4 * TTL + 30)
    if back["address"] != other.multiplexer_address:
        raise AssertionError(f"client reconnected to {back['address']}, "
                             f"not {other.multiplexer_address}")
    gone, _, _ = await watch.next(client_id, DISCONNECTED, after=since)
    listed, _, _ = await watch.next(client_id, CONNECTED, after=gone)
    probe = await _probe_until_ok(scene.reactor, other, client_id)
    return back, gone, listed, probe


async def node_killed(reactor, workdir, client_id="edge-cluster-kill"):
    """kill -9 the node holding the client; the other node takes it over."""
    async with ClusterScene(reactor, workdir) as scene:
        client, holder, other, watch, forwarded = await _two_nodes_and_a_client(
            scene, client_id)
        mark = len(client.events)
        killed_at = holder.child.signal("KILL")
        back, gone, listed, probe = await _moved(scene, client, client_id, other, watch,
                                                 mark, killed_at)
        return {
            "ttl_s": TTL,
            "forwarded_before": forwarded["failed_first"] == 0,
            "disconnected_s": gone - killed_at,
            "reconnected_s": back["_seen"] - killed_at,
            "reconnected_after_expiry_s": back["_seen"] - gone,
            "listed_s": listed - killed_at,
            "watch_events": _kinds(watch, client_id, killed_at),
            "callable_after_s": probe["ok_after_s"],
            "listed_after": await in_thread(reactor, _list, other),
        }


async def node_stopped(reactor, workdir, client_id="edge-cluster-stop", streams=2):
    """SIGTERM the node holding the client while calls to it run through the other
    node: the calls finish, then the client moves to the other node."""
    async with ClusterScene(reactor, workdir) as scene:
        client, holder, other, watch, _ = await _two_nodes_and_a_client(
            scene, client_id, node_extra=("--shutdown-grace", "20"))
        held = callers.HeldStreams(reactor, other.proxy_address, client_id, streams)
        scene.closers.append(held.close)
        await held.when_established()
        mark = len(client.events)
        stopped_at = time.monotonic()
        stopping = holder.child.stop()
        # The client hears GoAway and waits for its calls in flight to end.
        await client.wait_for_message("is going away", since=mark)
        going = time.monotonic()
        moved_early = any("connected to multiplexer" in e.get("message", "")
                          for e in client.events[mark:])
        # The calls go on through the draining node, then end.
        held.finish(rounds=AFTER_GO_AWAY)
        outcomes = await held.when_ended()
        back, gone, listed, probe = await _moved(scene, client, client_id, other, watch,
                                                 mark, stopped_at)
        exit_ = await stopping
        return {
            "codes": sorted({outcome.code.name for outcome in outcomes}),
            "echo_errors": [outcome.error for outcome in outcomes if outcome.error],
            "bytes_checked": sum(outcome.checked for outcome in outcomes),
            "bytes_expected": streams * (callers.ROUNDS + AFTER_GO_AWAY) * len(
                echo_payload(0, 0)),
            "calls_ended_after_go_away_s": max(o.ended for o in outcomes) - going,
            "moved_before_calls_ended": moved_early,
            "reconnected_after_calls_s": back["_seen"] - max(o.ended for o in outcomes),
            "watch_events": _kinds(watch, client_id, stopped_at),
            "holder_exit_code": getattr(exit_, "exitCode", None),
            "callable_after_s": probe["ok_after_s"],
            "listed_after": await in_thread(reactor, _list, other),
        }


def _list(node):
    from reliability_kit.discovery import list_servers

    return list_servers(node.proxy_address)
