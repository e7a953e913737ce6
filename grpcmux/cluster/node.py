"""A server in cluster mode: its ClusterRegistry, made from the settings, and the
service order that keeps the node registered for as long as it serves."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred

from grpcmux.cluster.etcd import EtcdClient, parse_endpoints
from grpcmux.cluster.registry import ClusterRegistry


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
