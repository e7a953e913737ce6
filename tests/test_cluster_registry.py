"""Unit tests of grpcmux.cluster.registry and .store on the in-memory etcd fake."""

import json

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from fake_etcd import FakeEtcd, Link
from grpcmux.cluster.etcd import StoreUnavailable
from grpcmux.cluster.registry import ClusterRegistry
from grpcmux.handshake import HandshakeRejected
from grpcmux.registry import CONNECTED, DISCONNECTED, SERVING, UPDATED, ClientInfo

TTL = 3


def info(client_id, address="127.0.0.1:1"):
    return ClientInfo(client_id=client_id, connected_at=1.5,
                      remote_address=address, wire_protocol="native", labels=(("k", "v"),))


class Node:
    def __init__(self, clock, etcd, name):
        self.metrics = CollectorRegistry()
        self.link = Link(etcd)
        self.registry = ClusterRegistry(clock, self.link, name, f"{name}.example:7612", ttl=TTL,
                                        metrics_registry=self.metrics, check_interval=1.0)
        self.events = []
        self.health = []
        self.evicted = []
        self.registry.subscribe(lambda e: self.events.append((e.kind, e.info.client_id,
                                                              e.info.node)))
        self.registry.add_health_observer(self.health.append)
        self.registry.evict = lambda client_id, reason: self.evicted.append(client_id)
        self.registry.startService()

    def connect(self, client_id, address="127.0.0.1:1"):
        d = self.registry.claim(client_id)
        result = []
        d.addBoth(result.append)
        assert result, "the fake answers at once"
        if isinstance(result[0], str):
            self.registry.add(info(client_id, address))
        return result[0]

    def metric(self, name):
        return self.metrics.get_sample_value(name)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def etcd(clock):
    return FakeEtcd(clock)


def stop(*nodes):
    for node in nodes:
        node.registry.stopService()


def kill(node):
    """The node's process dies: no more keep-alives, watch or writes."""
    node.link.silence()


def lease_of(etcd, node):
    """The lease the node's registration is kept under."""
    return etcd.data[f"/grpcmux/nodes/{node}"].lease


def advance(clock, etcd, seconds, step=0.5):
    for _ in range(int(seconds / step)):
        clock.advance(step)
        etcd.expire()


def test_registers_node_and_clients(clock, etcd):
    a = Node(clock, etcd, "a")
    assert a.health == [False, True]
    assert a.metric("grpcmux_cluster_registered") == 1
    node = json.loads(etcd.data["/grpcmux/nodes/a"].value)
    assert node["address"] == "a.example:7612"
    assert a.connect("one") == "one"
    value = json.loads(etcd.data["/grpcmux/clients/one"].value)
    assert value == {"node": "a", "connected_at": 1.5, "remote_address": "127.0.0.1:1",
                     "wire_protocol": "native", "labels": [["k", "v"]], "health": "unknown"}
    assert etcd.data["/grpcmux/clients/one"].lease == lease_of(etcd, "a")
    assert a.registry.get("one").node == "a"
    assert a.registry.node_address("a") == "a.example:7612"
    a.registry.remove("one")
    assert "/grpcmux/clients/one" not in etcd.data
    assert a.events == [(CONNECTED, "one", "a"), (DISCONNECTED, "one", "a")]
    stop(a)
    assert etcd.leases == {} and etcd.data == {}


def test_every_node_sees_the_whole_cluster_once(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    b.connect("two")
    for node in (a, b):
        assert sorted(node.registry.snapshot) == ["one", "two"]
        assert sorted(node.events) == [(CONNECTED, "one", "a"), (CONNECTED, "two", "b")]
    assert b.registry.get("one").remote_address == "127.0.0.1:1"
    assert b.registry.node_address("a") == "a.example:7612"
    stop(a, b)


def test_live_holder_keeps_its_id(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    refused = b.connect("one")
    assert refused.check(HandshakeRejected)
    assert "node a" in str(refused.value)
    assert b.events == [(CONNECTED, "one", "a")]
    assert "one" not in b.registry.pending_claims
    b.registry.claim("two")  # a handshake in progress
    assert b.registry.pending_claims == {"two"}
    b.registry.release("two")
    assert b.registry.pending_claims == set()
    stop(a, b)


def test_dead_holders_claim_is_taken_over(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    kill(a)  # its lease expires, and its keys with it
    advance(clock, etcd, TTL + 1)
    assert b.connect("one") == "one"
    assert b.registry.get("one").node == "b"
    assert b.events == [(CONNECTED, "one", "a"), (DISCONNECTED, "one", "a"),
                        (CONNECTED, "one", "b")]
    stop(b)


def test_expired_lease_with_key_left_is_taken_over(clock, etcd):
    b = Node(clock, etcd, "b")
    stale = etcd.grant(TTL).result
    etcd.put("/grpcmux/clients/one", json.dumps({"node": "a"}).encode(), stale)
    etcd.leases[stale] = clock.seconds() - 1  # expired, not yet reaped
    etcd.expire = lambda: None
    assert b.connect("one") == "one"
    assert json.loads(etcd.data["/grpcmux/clients/one"].value)["node"] == "b"
    stop(b)


def test_losing_etcd_keeps_local_clients_then_reregisters(clock, etcd, log_events):
    a = Node(clock, etcd, "a")
    a.connect("one")
    etcd.set_down(True)
    advance(clock, etcd, TTL + 1)
    assert a.health == [False, True, False]
    assert a.metric("grpcmux_cluster_registered") == 0
    assert a.metric("grpcmux_cluster_lease_lost_total") == 1
    assert a.connect("two") == "two"  # admitted here, claimed once etcd is back
    assert sorted(a.registry.snapshot) == ["one", "two"]
    assert any("lost its etcd lease" in e.get("log_format", "") for e in log_events)
    etcd.set_down(False)
    advance(clock, etcd, 2 * TTL)
    assert a.health[-1] is True
    assert {k for k in etcd.data if "clients" in k} == {
        "/grpcmux/clients/one", "/grpcmux/clients/two"}
    assert all(etcd.data[k].lease == lease_of(etcd, "a") for k in etcd.data)
    assert a.events == [(CONNECTED, "one", "a"), (CONNECTED, "two", "a")]
    stop(a)


def test_id_claimed_elsewhere_meanwhile_closes_the_stale_session(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    # a is cut off from etcd (only a: b still reaches it).
    a.link.cut = {"keep_alive", "grant", "create", "replace", "delete", "time_to_live"}
    advance(clock, etcd, TTL + 1)  # a's lease expires in etcd
    assert b.connect("one") == "one"  # the client reconnected to b
    a.link.cut = set()
    advance(clock, etcd, 2 * TTL)
    assert a.health[-1] is True
    assert a.evicted == ["one"]
    assert a.metric("grpcmux_cluster_evicted_sessions_total") == 1
    assert a.registry.get("one").node == "b"
    assert a.events == [(CONNECTED, "one", "a"), (DISCONNECTED, "one", "a"),
                        (CONNECTED, "one", "b")]
    assert a.registry.remove("one") is None  # the server forgets the closed session
    assert etcd.data["/grpcmux/clients/one"].lease == lease_of(etcd, "b")
    stop(a, b)


def test_watch_resumes_after_errors_without_gaps_or_repeats(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    for watch in [w for w in b.link.watches if not w.cancelled]:
        watch.cancel()
        watch.on_end(StoreUnavailable("member died"))
    a.connect("two")  # while b's watch is down
    advance(clock, etcd, 2)
    a.connect("three")
    assert b.events == [(CONNECTED, "one", "a"), (CONNECTED, "two", "a"),
                        (CONNECTED, "three", "a")]
    stop(a, b)


def test_stalled_watch_is_noticed_and_replaced(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    (stalled,) = [w for w in b.link.watches if not w.cancelled]
    stalled.stalled = True
    a.connect("one")
    assert b.events == []
    advance(clock, etcd, 3)
    assert stalled.cancelled
    assert b.events == [(CONNECTED, "one", "a")]
    stop(a, b)


def test_compaction_rereads_and_tells_only_the_difference(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    a.connect("two")
    for watch in [w for w in b.link.watches if not w.cancelled]:
        watch.cancel()
        watch.on_end(StoreUnavailable("member died"))
    a.registry.remove("one")
    a.connect("three")
    etcd.compact()
    advance(clock, etcd, 2)
    assert b.events == [(CONNECTED, "one", "a"), (CONNECTED, "two", "a"),
                        (DISCONNECTED, "one", "a"), (CONNECTED, "three", "a")]
    assert sorted(b.registry.snapshot) == ["three", "two"]
    stop(a, b)


def test_node_name_held_by_a_live_process_waits(clock, etcd):
    a = Node(clock, etcd, "a")
    twin = Node(clock, etcd, "a")
    assert twin.health == [False]
    stop(a)
    advance(clock, etcd, TTL)
    assert twin.health == [False, True]
    stop(twin)


def test_released_claim_deletes_the_pending_key(clock, etcd):
    a = Node(clock, etcd, "a")
    a.registry.claim("one")
    assert json.loads(etcd.data["/grpcmux/clients/one"].value) == {"node": "a"}
    b = Node(clock, etcd, "b")
    assert "one" not in b.registry.snapshot  # pending: not listed
    a.registry.release("one")
    assert "/grpcmux/clients/one" not in etcd.data
    assert a.events == [] and b.events == []
    stop(a, b)


def test_updates_in_place_reach_every_node_as_updated(clock, etcd):
    a, b = Node(clock, etcd, "a"), Node(clock, etcd, "b")
    a.connect("one")
    updates = []
    b.registry.subscribe(lambda e: updates.append((e.kind, e.info.health)), updates=True)
    assert a.registry.update("one", health=SERVING).health == SERVING
    assert a.registry.update("nobody", health=SERVING) is None
    assert b.registry.get("one").health == SERVING
    assert updates == [(UPDATED, SERVING)]
    assert b.events == [(CONNECTED, "one", "a")]  # observers of two kinds see none
    stop(a, b)
