"""A cluster node's registry in a process of its own, for kill -9 tests.

``python3 tests/cluster_node.py ETCD_URLS NODE PREFIX TTL CLIENT_ID...`` registers
in etcd, adds the given clients once registered, and runs until killed. The test
knows it is up when another node's registry lists those clients.
"""

import sys
import time


def main(urls, node, prefix, ttl, *client_ids):
    from twisted.internet import reactor

    from grpcmux.cluster.etcd import EtcdClient, parse_endpoints
    from grpcmux.cluster.registry import ClusterRegistry
    from grpcmux.registry import ClientInfo

    targets, _ = parse_endpoints(urls)
    registry = ClusterRegistry(reactor, EtcdClient(reactor, targets), node,
                               f"{node}.test:7612", ttl=int(ttl), prefix=prefix)

    def health(serving):
        if serving and not registry.snapshot:
            for client_id in client_ids:
                registry.add(ClientInfo(client_id=client_id, connected_at=time.time(),
                                        remote_address="192.0.2.1:1",
                                        wire_protocol="native"))

    registry.add_health_observer(health)
    reactor.callWhenRunning(registry.startService)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
