"""Cluster mode: several grpcmux servers share one registry in etcd (issue 13)."""
