"""A server in cluster mode: its ClusterRegistry made from the settings, the
router's view of the other nodes (:class:`NodeTargets`), and the service order
that keeps the node registered for as long as it serves."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import wrapClientTLS

from grpcmux import tls
from grpcmux.addresses import client_endpoint, parse_host_port
from grpcmux.cluster.etcd import EtcdClient, parse_endpoints
from grpcmux.cluster.registry import ClusterRegistry
from grpcmux.http2.targets import NodeTarget


def cluster_registry(settings, reactor, metrics_registry=None):
    """The ClusterRegistry the settings describe (``--cluster-etcd`` and friends)."""
    targets, _ = parse_endpoints(settings.cluster_etcd)
    client = EtcdClient(reactor, targets, tls=settings.etcd_tls,
                        user=settings.cluster_etcd_user, password=settings.etcd_password)
    return ClusterRegistry(reactor, client, settings.node_name, settings.cluster_advertise,
                           metrics_registry=metrics_registry)


class ClusterNode(MultiService):
    """The registry starts first (registration runs while the server starts) and
    stops last: the server's clients depart first, then the lease is revoked, which
    removes whatever of this node is left in etcd at once."""

    def __init__(self, registry, server):
        super().__init__()
        self.registry = registry
        self.server = server
        registry.setName("cluster")
        registry.setServiceParent(self)
        server.setServiceParent(self)

    def stopService(self):
        Service.stopService(self)
        stopped = maybeDeferred(self.server.stopService)
        stopped.addCallback(lambda _: self.registry.stopService())
        return stopped


class NodeTargets:
    """The router's ``remote(info)``: the target of the node that holds a client
    connected elsewhere, dialled at the address that node advertises in etcd; None
    for this node's clients and for a node not (or no longer) registered.

    One target per (node, address), so the router keeps its pool to a node until
    the node comes back at another address. ``tls_files``: (cert, key, CA) for
    mutual TLS between nodes, or None; the certificate of every node must name the
    host of its advertised address.
    """

    def __init__(self, reactor, registry, token, tls_files=None):
        self._reactor = reactor
        self._registry = registry
        self._token = token
        self._tls_files = tls_files
        self._targets = {}

    def __call__(self, info):
        registry = self._registry
        if not info.node or info.node == registry.node_name:
            return None
        address = registry.node_address(info.node)
        if address is None:
            return None
        key = (info.node, address)
        target = self._targets.get(key)
        if target is None:
            self._targets = {k: t for k, t in self._targets.items() if k[0] != info.node}
            endpoint = client_endpoint(self._reactor, address)
            if self._tls_files is not None:
                cert, private_key, ca = self._tls_files
                host = parse_host_port(address)[0]
                endpoint = wrapClientTLS(
                    tls.client_creator(host, ca, cert, private_key), endpoint)
            target = self._targets[key] = NodeTarget(info.node, endpoint, self._token)
        return target


def proxy_options(settings, reactor, registry):
    """The ProxyService arguments of cluster mode: the cluster listener (calls other
    nodes forward here, with the node token), and where to forward calls for
    clients held elsewhere."""
    tls_files = None
    listener_tls = None
    if settings.cluster_tls_cert:
        tls_files = (settings.cluster_tls_cert, settings.cluster_tls_key,
                     settings.cluster_tls_ca)
        listener_tls = tls.server_options(*tls_files)
    token = settings.cluster_token.encode()
    return dict(
        remote=NodeTargets(reactor, registry, token, tls_files),
        cluster_listener=settings.cluster_listener,
        node_token=token,
        cluster_tls=listener_tls,
    )
