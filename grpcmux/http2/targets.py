"""Upstream targets: where a pool's connections go, and what a failure means there.

:class:`TunnelTarget` reaches a connected multiplexer client: every connection is a
new yamux stream of its tunnel (the outer session of a native client, the nested
one of a legacy client), which the client splices to its gRPC server.
:class:`EndpointTarget` reaches a Twisted client endpoint: the local grpcio
services' private socket (and, in a cluster, another node).
"""

from hpack import NeverIndexedHeaderTuple
from twisted.internet.defer import fail

from grpcmux.yamux.endpoints import YamuxStreamClientEndpoint

from .status import UNAVAILABLE


class TunnelTarget:
    """A connected client, reached through yamux streams of ``session``."""

    def __init__(self, client_id, session):
        self.label = client_id
        self.session = session
        self._endpoint = YamuxStreamClientEndpoint(session)

    def connect(self, factory):
        if self.session.closed:
            return fail(ConnectionError("its session is closed"))
        return self._endpoint.connect(factory)

    def failure(self, connection, reason):
        """The status for calls cut by ``connection`` ending (None: no connection)."""
        name = f"client '{self.label}'"
        if self.session.closed or (connection is None and reason is None):
            return UNAVAILABLE, f"{name} is unavailable: it disconnected"
        if connection is None:
            return UNAVAILABLE, f"{name} is unavailable: {reason}"
        if not connection.settings_received:
            # The client reset the stream instead of splicing it: no gRPC server.
            return UNAVAILABLE, f"{name} cannot reach its gRPC server"
        return UNAVAILABLE, f"{name} lost its connection to its gRPC server"


class NodeTarget:
    """Another node of a cluster, holding the clients it lists, behind its cluster
    listener; every call presents the cluster's node token."""

    def __init__(self, name, endpoint, token):
        self.label = f"node:{name}"
        self.name = name
        self._endpoint = endpoint
        self.headers = [NeverIndexedHeaderTuple(b"grpcmux-node-token", token)]

    def connect(self, factory):
        return self._endpoint.connect(factory)

    def failure(self, connection, reason):
        return UNAVAILABLE, f"grpcmux node '{self.name}' is unavailable"


class EndpointTarget:
    """An upstream behind a Twisted client endpoint; ``label`` names it in metrics."""

    def __init__(self, endpoint, label="", unavailable="the proxy's own services are unavailable"):
        self.label = label
        self._endpoint = endpoint
        self._unavailable = unavailable

    def connect(self, factory):
        return self._endpoint.connect(factory)

    def failure(self, connection, reason):
        return UNAVAILABLE, self._unavailable
