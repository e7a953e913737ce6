"""Integration tests of grpcmux.cluster against real etcd processes on loopback."""

import os
import sys
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol

from etcd_cluster import EtcdCluster
from grpcmux.cluster.etcd import EtcdClient, parse_endpoints
from grpcmux.cluster.registry import ClusterRegistry
from grpcmux.handshake import HandshakeRejected
from grpcmux.registry import CONNECTED, DISCONNECTED, ClientInfo

TTL = 2
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path, members=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3(tmp_path):
    cluster = EtcdCluster(tmp_path, members=3).start()
    yield cluster
    cluster.stop()


def info(client_id):
    return ClientInfo(client_id=client_id, connected_at=time.time(),
                      remote_address="192.0.2.7:4567", wire_protocol="native",
                      labels=(("zone", "a"),))


class Node:
    """A ClusterRegistry with its observed events and health."""

    def __init__(self, reactor, cluster, name, endpoints=None, **client_options):
        self.reactor = reactor
        targets, _ = parse_endpoints(endpoints or cluster.endpoints)
        self.client = EtcdClient(reactor, targets, call_timeout=1.0, **client_options)
        self.registry = ClusterRegistry(reactor, self.client, name, f"{name}.test:7612",
                                        ttl=TTL, check_interval=1.0)
        self.events = []
        self.health = []
        self.evicted = []
        self.registry.subscribe(
            lambda e: self.events.append((e.kind, e.info.client_id, e.info.node)))
        self.registry.add_health_observer(self.health.append)
        self.registry.evict = lambda client_id, reason: self.evicted.append(client_id)
        self.registry.startService()

    def until(self, predicate, timeout=10.0, what="the condition"):
        """A Deferred firing once ``predicate()`` holds (checked on every registry
        event and health change), failing after ``timeout`` s."""
        if predicate():
            return succeed(None)
        d = Deferred()
        removers = []

        def check(_=None):
            if not d.called and predicate():
                for remove in removers:
                    remove()
                d.callback(None)

        removers.append(self.registry.subscribe(check))
        removers.append(self.registry.add_health_observer(check))
        d.addTimeout(timeout, self.reactor)
        return d

    def serving(self, timeout=10.0):
        return self.until(lambda: self.registry.serving, timeout)

    def lists(self, *client_ids, timeout=10.0):
        return self.until(lambda: sorted(self.registry.snapshot) == sorted(client_ids),
                          timeout)

    def claim_and_add(self, client_id):
        d = self.registry.claim(client_id).addTimeout(10, self.reactor)
        return d.addCallback(lambda _: self.registry.add(info(client_id)))

    def stop(self):
        return self.registry.stopService().addTimeout(10, self.reactor)


@pytest_twisted.ensureDeferred
async def test_client_calls_against_etcd(reactor, etcd):
    targets, tls = parse_endpoints(etcd.endpoints)
    assert not tls
    client = EtcdClient(reactor, targets)
    client.start()
    try:
        lease = await client.grant(TTL).addTimeout(10, reactor)
        created = await client.create("/t/a", b"1", lease).addTimeout(10, reactor)
        assert created.created
        again = await client.create("/t/a", b"2", lease).addTimeout(10, reactor)
        assert not again.created and again.holder.value == b"1"
        assert again.holder.lease == lease
        first = again.holder.mod_revision
        assert await client.replace("/t/a", b"3", lease, first - 1).addTimeout(10, reactor) is None
        second = await client.replace("/t/a", b"3", lease, first).addTimeout(10, reactor)
        assert second > first
        revision, kvs = await client.read_prefix("/t/", first).addTimeout(10, reactor)
        assert [kv.value for kv in kvs] == [b"1"]  # the read at that revision
        assert await client.time_to_live(lease).addTimeout(10, reactor) > 0
        assert await client.keep_alive(lease).addTimeout(10, reactor) == TTL
        batches = []
        got = Deferred()

        def on_batch(batch):
            batches.append(batch)
            if sum(len(b.events) for b in batches) == 2 and not got.called:
                got.callback(None)

        handle = client.watch("/t/", first, on_batch, lambda error: None)
        await got.addTimeout(10, reactor)
        assert [e.kv.value for b in batches for e in b.events] == [b"1", b"3"]
        handle.cancel()
        assert await client.delete("/t/a", second).addTimeout(10, reactor)
        await client.revoke(lease).addTimeout(10, reactor)
        assert await client.time_to_live(lease).addTimeout(10, reactor) == -1
        assert await client.keep_alive(lease).addTimeout(10, reactor) == 0
    finally:
        await client.stop().addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_view_and_one_owner_per_id(reactor, etcd):
    a, b = Node(reactor, etcd, "a"), Node(reactor, etcd, "b")
    try:
        await a.serving()
        await b.serving()
        await a.claim_and_add("one")
        await b.claim_and_add("two")
        await a.lists("one", "two")
        await b.lists("one", "two")
        assert b.registry.get("one").node == "a"
        assert b.registry.get("one").labels == (("zone", "a"),)
        assert b.registry.node_address("a") == "a.test:7612"
        with pytest.raises(HandshakeRejected):
            await b.registry.claim("one").addTimeout(10, reactor)
        a.registry.remove("one")
        await b.lists("two")
        assert b.events == [(CONNECTED, "one", "a"), (CONNECTED, "two", "b"),
                            (DISCONNECTED, "one", "a")] or b.events == [
            (CONNECTED, "two", "b"), (CONNECTED, "one", "a"), (DISCONNECTED, "one", "a")]
    finally:
        await a.stop()
        await b.stop()


class _Child(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()
        self.output = []

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_node_removes_its_clients_within_the_ttl(reactor, etcd):
    b = Node(reactor, etcd, "b")
    child = _Child()
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = reactor.spawnProcess(
        child, sys.executable,
        [sys.executable, os.path.join(HERE, "cluster_node.py"), etcd.endpoints, "a",
         "/grpcmux/", str(TTL), "one", "two"], env=env)
    try:
        await b.serving()
        await b.lists("one", "two", timeout=20)
        assert {b.registry.get(i).node for i in ("one", "two")} == {"a"}
        process.signalProcess("KILL")
        await child.ended.addTimeout(10, reactor)
        killed = time.monotonic()
        await b.lists(timeout=TTL + 3)
        # etcd reaps expired leases every 500 ms: within the TTL plus that.
        assert time.monotonic() - killed < TTL + 1.5
        assert b.events[-2:] in ([(DISCONNECTED, "one", "a"), (DISCONNECTED, "two", "a")],
                                 [(DISCONNECTED, "two", "a"), (DISCONNECTED, "one", "a")])
        await b.claim_and_add("one")  # the dead holder's id is free
        assert b.registry.get("one").node == "b"
    finally:
        if child.ended.called is False:
            process.signalProcess("KILL")
            await child.ended.addTimeout(10, reactor)
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_losing_etcd_keeps_serving_then_reregisters(reactor, etcd):
    a = Node(reactor, etcd, "a")
    try:
        await a.serving()
        await a.claim_and_add("one")
        etcd.kill(0)
        await a.until(lambda: not a.registry.serving, timeout=TTL + 5)
        assert a.registry.get("one").node == "a"  # its own client: still served here
        # A client connecting meanwhile is admitted here, claimed once etcd is back.
        await a.claim_and_add("two")
        etcd.restart(0)
        await a.serving(timeout=20)
        b = Node(reactor, etcd, "b")
        try:
            await b.lists("one", "two")
        finally:
            await b.stop()
        assert a.health[-3:] == [True, False, True]
        assert a.events == [(CONNECTED, "one", "a"), (CONNECTED, "two", "a")]
    finally:
        await a.stop()


def _members_endpoints(cluster, order):
    return ",".join(cluster.members[i].url for i in order)


@pytest_twisted.ensureDeferred
async def test_three_members_lose_one_and_the_registry_keeps_working(reactor, etcd3):
    # a talks to member 0 first, b to member 1: killing member 0 moves a on.
    a = Node(reactor, etcd3, "a", _members_endpoints(etcd3, (0, 1, 2)))
    b = Node(reactor, etcd3, "b", _members_endpoints(etcd3, (1, 2, 0)))
    try:
        await a.serving()
        await b.serving()
        await a.claim_and_add("one")
        await b.lists("one")
        etcd3.kill(0)
        await a.claim_and_add("two")
        await b.lists("one", "two", timeout=15)
        await b.claim_and_add("three")
        await a.lists("one", "two", "three", timeout=15)
        # The lease outlived the member it was kept alive on; events came once each.
        assert a.health == [False, True]
        assert sorted(b.events) == sorted([(CONNECTED, "one", "a"), (CONNECTED, "two", "a"),
                                           (CONNECTED, "three", "b")])
        assert len(a.events) == 3
    finally:
        await a.stop()
        await b.stop()


def _watch_events(responses, count):
    return [(r.server, r.event, r.details.remote_address) for _, r in zip(range(count),
                                                                         responses)]


@pytest_twisted.ensureDeferred
async def test_discovery_on_any_node_shows_the_cluster_across_a_leader_change(
        reactor, etcd3, tmp_path):
    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
    from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
    from rpc_backend import Mux

    a = Node(reactor, etcd3, "a")
    b = Node(reactor, etcd3, "b", _members_endpoints(etcd3, (etcd3.leader(), 0, 1, 2)))
    mux = Mux(reactor, tmp_path, registry=b.registry)
    stub = DiscoveryServiceStub(mux.channel)
    connected = pb.WatchGRPCServerResponse.EVENT_CONNECTED
    disconnected = pb.WatchGRPCServerResponse.EVENT_DISCONNECTED
    try:
        await a.serving()
        await b.serving()
        await a.claim_and_add("one")
        await b.claim_and_add("two")
        await b.lists("one", "two")
        listed = await mux.in_thread(stub.ListGRPCServer, pb.ListGRPCServerRequest(),
                                     timeout=10)
        assert list(listed.servers) == ["one", "two"]
        responses = stub.WatchGRPCServer(pb.WatchGRPCServerRequest(replay=True), timeout=60)
        replayed = await mux.in_thread(_watch_events, responses, 2)
        assert [r[:2] for r in replayed] == [("one", connected), ("two", connected)]
        etcd3.kill(etcd3.leader())  # b's watch was on the leader: it moves on
        a.registry.remove("one")
        await b.lists("two", timeout=20)
        await a.claim_and_add("three")
        await b.lists("two", "three", timeout=20)
        # Exactly the changes, once each: a further event proves nothing else is queued.
        await b.claim_and_add("four")
        live = await mux.in_thread(_watch_events, responses, 3)
        assert [r[:2] for r in live] == [("one", disconnected), ("three", connected),
                                         ("four", connected)]
        assert live[1][2] == "192.0.2.7:4567"
        responses.cancel()
    finally:
        await mux.stop()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_node_cut_off_from_etcd_closes_its_stale_session_on_return(reactor, etcd3):
    # a reaches only member 0; b reaches the other two, which keep quorum.
    a = Node(reactor, etcd3, "a", etcd3.members[0].url)
    b = Node(reactor, etcd3, "b", _members_endpoints(etcd3, (1, 2)))
    try:
        await a.serving()
        await b.serving()
        await a.claim_and_add("one")
        await b.lists("one")
        etcd3.kill(0)
        await a.until(lambda: not a.registry.serving, timeout=TTL + 5)
        await b.lists(timeout=TTL + 5)  # a's lease expired: its client is gone
        await b.claim_and_add("one")  # the client reconnected to b
        assert a.registry.get("one").node == "a"  # a still serves its old session
        etcd3.restart(0)
        await a.until(lambda: getattr(a.registry.get("one"), "node", None) == "b", timeout=30)
        assert a.evicted == ["one"]
        await a.serving()
        assert a.events == [(CONNECTED, "one", "a"), (DISCONNECTED, "one", "a"),
                            (CONNECTED, "one", "b")]
    finally:
        await a.stop()
        await b.stop()


def _enable_auth(cluster, credentials, user, password):
    """Users root and ``user`` (read-write on /grpcmux/ only), then auth on."""
    import grpc

    from grpcmux._proto.etcd.auth.authpb import auth_pb2
    from grpcmux._proto.etcd.etcdserver.etcdserverpb import rpc_pb2 as pb
    from grpcmux._proto.etcd.etcdserver.etcdserverpb import rpc_pb2_grpc as rpc

    with grpc.secure_channel(f"127.0.0.1:{cluster.members[0].client_port}",
                             credentials) as channel:
        auth = rpc.AuthStub(channel)
        auth.UserAdd(pb.AuthUserAddRequest(name="root", password="root-pw"), timeout=10)
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        auth.UserAdd(pb.AuthUserAddRequest(name=user, password=password), timeout=10)
        auth.RoleAdd(pb.AuthRoleAddRequest(name="grpcmux"), timeout=10)
        auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(
            name="grpcmux", perm=auth_pb2.Permission(
                permType=auth_pb2.Permission.READWRITE, key=b"/grpcmux/",
                range_end=b"/grpcmux0")), timeout=10)
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user=user, role="grpcmux"), timeout=10)
        auth.AuthEnable(pb.AuthEnableRequest(), timeout=10)


@pytest_twisted.ensureDeferred
async def test_etcd_over_mutual_tls_with_a_user(reactor, tmp_path, pki):
    import grpc

    cluster = EtcdCluster(tmp_path, tls=(pki.server.cert, pki.server.key, pki.ca)).start()
    try:
        pem = [open(path, "rb").read() for path in (pki.ca, pki.client.key, pki.client.cert)]
        _enable_auth(cluster, grpc.ssl_channel_credentials(*pem), "grpcmux", "pw")
        targets, https = parse_endpoints(cluster.endpoints)
        assert https
        a, b = [Node(reactor, cluster, name, tls=tuple(pem), user="grpcmux", password="pw")
                for name in ("a", "b")]
        try:
            await a.serving()
            await b.serving()
            await a.claim_and_add("one")
            await b.lists("one")
            assert b.registry.get("one").node == "a"
        finally:
            await a.stop()
            await b.stop()
        # Without the user, etcd refuses: the registry never registers.
        stranger = EtcdClient(reactor, targets, tls=tuple(pem))
        stranger.start()
        try:
            with pytest.raises(Exception, match="user name is empty|permission denied"):
                await stranger.read_prefix("/grpcmux/").addTimeout(10, reactor)
        finally:
            await stranger.stop().addTimeout(10, reactor)
    finally:
        cluster.stop()
