"""Cluster mode through make_service: two whole servers on one real etcd."""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from etcd_cluster import EtcdCluster, free_port
from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.cluster.node import ClusterNode
from grpcmux.cluster.registry import ClusterRegistry
from grpcmux.config import ClientSettings, load_server_settings
from grpcmux.registry import ClientRegistry
from grpcmux.server_service import ServerService
from grpcmux.tap.server import make_service
from mux_stack import RecordingPolicy, first_report

TIMEOUT = 20.0


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path, members=1).start()
    yield cluster
    cluster.stop()


def settings(tmp_path, name, etcd=None, **extra):
    flags = {"multiplexer_listener": "tcp:0:interface=127.0.0.1",
             "proxy_listener": "127.0.0.1:0", "runtime_dir": str(tmp_path / f"run-{name}"),
             "shutdown_grace": "1"}
    if etcd is not None:
        token = tmp_path / "cluster.token"
        token.write_text("shared-secret\n")
        flags.update(cluster_etcd=etcd.endpoints, node_name=name,
                     cluster_listener=f"127.0.0.1:{free_port()}",
                     cluster_token_file=str(token))
    flags.update(extra)
    return load_server_settings(flags, environ={}, home=str(tmp_path))


def test_without_cluster_etcd_nothing_changes(reactor, tmp_path):
    service = make_service(settings(tmp_path, "solo"), reactor)
    assert isinstance(service, ServerService)
    assert type(service.multiplexer.registry) is ClientRegistry
    assert service.multiplexer.clients.cluster_claims is None


def until(reactor, registry, predicate):
    d = Deferred()
    if predicate():
        d.callback(None)
        return d

    def check(_):
        if not d.called and predicate():
            unsubscribe()
            d.callback(None)

    unsubscribe = registry.subscribe(check)
    return d.addTimeout(TIMEOUT, reactor)


def client(reactor, node, client_id, backend="127.0.0.1:1"):
    port = node.server.multiplexer.port.getHost().port
    settings = ClientSettings(client_id=client_id, grpc_server_address=backend,
                              multiplexer_address=f"127.0.0.1:{port}")
    tunnel = Tunnel(reactor, settings, retry_policy=RecordingPolicy())
    service = TunnelClientService(reactor, tunnel)
    service.startService()
    return service


@pytest_twisted.ensureDeferred
async def test_two_servers_share_their_clients_and_their_ids(reactor, tmp_path, etcd):
    a = make_service(settings(tmp_path, "a", etcd), reactor)
    b = make_service(settings(tmp_path, "b", etcd), reactor)
    assert isinstance(a, ClusterNode) and isinstance(a.registry, ClusterRegistry)
    assert a.registry.advertise.startswith("127.0.0.1:")
    clients = []
    try:
        a.startService()
        b.startService()
        clients.append(client(reactor, a, "alpha"))
        await clients[0].when_connected().addTimeout(TIMEOUT, reactor)
        await until(reactor, b.registry, lambda: "alpha" in b.registry.snapshot)
        assert b.registry.get("alpha").node == "a"
        assert b.registry.node_address("a") == a.registry.advertise
        # The same id on the other server: the live holder keeps it.
        clients.append(client(reactor, b, "alpha"))
        problem = await first_report(clients[1])
        assert "already connected (to node a)" in problem
        assert b.server.multiplexer.connected_clients == {}
        await clients.pop().stopService()
        # The registry's evict hook closes this node's session of an id.
        events = []
        a.registry.subscribe(lambda e: events.append((e.kind, e.info.client_id)))
        a.registry.evict("alpha", "client id owned by node b")
        assert "alpha" not in a.server.multiplexer.connected_clients
        assert events[0] == ("disconnected", "alpha")
        # The client reconnects, and is claimed and listed again.
        await until(reactor, a.registry,
                    lambda: "alpha" in a.server.multiplexer.connected_clients)
        await until(reactor, b.registry, lambda: "alpha" in b.registry.snapshot)
        await clients.pop().stopService()
        await until(reactor, b.registry, lambda: "alpha" not in b.registry.snapshot)
    finally:
        await DeferredList([c.stopService() for c in clients])
        stopping = [n.stopService() for n in (a, b) if n.running]
        await DeferredList(stopping).addTimeout(TIMEOUT, reactor)


@pytest.mark.parametrize("mutual_tls", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_call_entering_another_node_reaches_the_client(reactor, tmp_path, etcd, pki,
                                                              mutual_tls):
    import grpc

    from rpc_backend import UNLIMITED, Backend, in_thread, invoke, route

    mtls = {}
    if mutual_tls:
        mtls = dict(cluster_tls_cert=pki.node.cert, cluster_tls_key=pki.node.key,
                    cluster_tls_ca=pki.ca)
    a = make_service(settings(tmp_path, "a", etcd, **mtls), reactor)
    b = make_service(settings(tmp_path, "b", etcd, **mtls), reactor)
    backend = Backend(str(tmp_path / "backend.sock"), tcp=True)
    clients, channel = [], None
    try:
        a.startService()
        b.startService()
        clients.append(client(reactor, a, "lab", backend=backend.tcp_address))
        await clients[0].when_connected().addTimeout(TIMEOUT, reactor)
        await until(reactor, b.registry, lambda: "lab" in b.registry.snapshot)
        channel = grpc.insecure_channel(f"127.0.0.1:{b.server.proxy.port}", options=UNLIMITED)
        result = await in_thread(reactor, invoke, channel, "Unary", b"through b",
                                 route("lab"), 10)
        assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"through b"]), \
            result.details
        assert "grpcmux-node-token" not in dict(backend.next_call().metadata)
    finally:
        if channel is not None:
            channel.close()
        await DeferredList([c.stopService() for c in clients])
        stopping = [n.stopService() for n in (a, b) if n.running]
        await DeferredList(stopping).addTimeout(TIMEOUT, reactor)
        await in_thread(reactor, backend.stop)
