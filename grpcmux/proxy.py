"""ProxyService: the proxy endpoint, an HTTP/2 router in the reactor.

The listener (any endpoint string; TLS through Twisted with ALPN ``h2``) hands each
caller connection to the :class:`~grpcmux.http2.router.Router`, which forwards calls
to connected clients' tunnels, and Discovery, health and reflection to the
:class:`~grpcmux.rpc.service.LocalServices` (grpcio in its own thread, on a private
UNIX socket in the runtime directory).

Stopping is graceful: the listener closes, every caller gets GOAWAY, calls in flight
get ``shutdown_grace`` seconds, then what remains is failed with UNAVAILABLE.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from grpcmux.addresses import describe_address
from grpcmux.http2.config import H2Config
from grpcmux.http2.connection import Budget
from grpcmux.http2.router import Router, RouterLimits
from grpcmux.http2.status import CallRefused, NOT_FOUND
from grpcmux.http2.targets import EndpointTarget
from grpcmux.listening import listen
from grpcmux.registry import DISCONNECTED
from grpcmux.runtime_dir import RuntimeDir


#: The health service name that says whether this node is registered in its cluster.
CLUSTER_SERVICE = "grpcmux.cluster"
#: Bytes the router may buffer for all its streams together (see ``Budget``).
BUFFER_BUDGET = 256 * 1024 * 1024
#: HTTP/2 of the callers' connections: the protocol library's bounds.
CALLER_CONFIG = H2Config()
#: Upstreams are ours or our clients' backends: no idle limit, generous control
#: budgets, but a backend that never speaks HTTP/2 fails its calls.
UPSTREAM_CONFIG = H2Config(idle_timeout=0, control_burst=10**6, control_rate=10**5)


class ProxyService(Service):
    """The proxy endpoint: routes calls to clients, answers Discovery, health, reflection.

    ``settings`` (ServerSettings) give the listener, the routing by authority and
    default client, the limits, the shutdown grace, the Watch queue and the runtime
    directory. ``tunnels(client_id)`` returns the upstream target of a connected
    client, or None (the multiplexer server's :meth:`tunnel_for`). ``observer``, if
    given, is told of every call that ends (see :class:`Router`). ``tls``
    (ServerTLS) and ``tokens`` (ProxyTokens), loaded from the settings' files,
    secure the endpoint; None: off. In a cluster, ``remote``, ``cluster_listener``,
    ``node_token`` and ``cluster_tls`` (see ``grpcmux.cluster.node.proxy_options``)
    forward calls between nodes.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        registry,
        settings,
        tunnels=None,
        observer=None,
        tls=None,
        tokens=None,
        remote=None,
        cluster_listener=None,
        node_token=None,
        cluster_tls=None,
        cluster_health=None,
    ):
        self._reactor = reactor
        self._registry = registry
        self.settings = settings
        self._tunnels = tunnels or (lambda client_id: None)
        self.tls = tls
        self.tokens = tokens
        self._runtime_dir = RuntimeDir(settings.runtime_dir)
        self.limits = RouterLimits.from_settings(settings)
        self._observer = observer
        self._remote = remote
        self._cluster_listener = cluster_listener
        self._node_token = node_token
        self._cluster_tls = cluster_tls  # Twisted TLS options of the cluster listener
        self.cluster_router = None
        self.cluster_port = None
        # add_health_observer(observer) of a cluster registry: the health of the
        # grpcmux.cluster service follows whether this node is registered in etcd.
        self._cluster_health = cluster_health
        self._unobserve_cluster = None
        self.budget = Budget(BUFFER_BUDGET)
        self._instance = os.urandom(8).hex().encode()  # this router's pseudonym in via
        self.router = None
        self.local = None
        self.listening_port = None
        self.port = None
        self._unsubscribe = None

    def startService(self):
        from grpcmux.rpc.service import LocalServices  # grpc after twistd forked

        path = self._runtime_dir.create()
        try:
            self.local = LocalServices(self._reactor, self._registry,
                                       self._runtime_dir.socket_path(), self.tokens,
                                       self.settings.watch_queue_limit)
            self.local.start()
            local = EndpointTarget(UNIXClientEndpoint(self._reactor, self.local.socket_path))
            self.router = Router(
                self._reactor, self._registry, self._tunnels, local,
                CALLER_CONFIG, UPSTREAM_CONFIG, limits=self.limits,
                tokens=self.tokens, observer=self._observer, budget=self.budget,
                instance=self._instance, remote=self._remote,
                authority_domain=self.settings.authority_domain,
                default_client_id=self.settings.default_client_id)
            factory = self.router.factory
            if self.tls is not None:
                factory = TLSMemoryBIOFactory(self.tls.options(), False, factory)
            self.listening_port = listen(self._reactor, self.settings.proxy_listener, factory,
                                         "proxy-listener")
            if self._cluster_listener is not None:
                self._listen_for_nodes()
        except BaseException:
            if self.listening_port is not None:
                self.listening_port.stopListening()
                self.listening_port = None
            self.local.stop(0)
            self._runtime_dir.remove()
            raise
        self.port = getattr(self.listening_port.getHost(), "port", None)
        self._unsubscribe = self._registry.subscribe(self._registry_changed)
        if self._cluster_health is not None:
            local = self.local
            self._unobserve_cluster = self._cluster_health(
                lambda serving: local.set_serving(CLUSTER_SERVICE, serving))
        super().startService()
        self._log.info("proxy endpoint listening on {address} ({security}; local services "
                       "in {runtime_dir})", address=describe_address(self.listening_port.getHost()),
                       security=self._describe_security(), runtime_dir=path, port=self.port)
        if self.tokens is not None and self.tls is None:
            self._log.warn("proxy tokens are checked but travel in plaintext: "
                           "serve the proxy endpoint over TLS (--proxy-tls-cert)")

    def _listen_for_nodes(self):
        """The cluster listener: calls other nodes forward to this node's clients."""
        self.cluster_router = Router(
            self._reactor, self._registry, self._tunnels, None, CALLER_CONFIG,
            UPSTREAM_CONFIG, limits=self.limits, observer=self._observer,
            budget=self.budget, instance=self._instance, node_token=self._node_token)
        factory = self.cluster_router.factory
        if self._cluster_tls is not None:
            factory = TLSMemoryBIOFactory(self._cluster_tls, False, factory)
        self.cluster_port = listen(self._reactor, self._cluster_listener, factory,
                                   "cluster-listener")
        self._log.info("cluster listener on {address}",
                       address=describe_address(self.cluster_port.getHost()))

    def _describe_security(self):
        transport = "plaintext"
        if self.tls is not None:
            transport = "mTLS" if self.tls.requires_client_certificates else "TLS"
        if self.tokens is None:
            return f"{transport}, no end-user tokens"
        return f"{transport}, {len(self.tokens)} end-user token(s)"

    def _registry_changed(self, event):
        if event.kind == DISCONNECTED:
            for router in (self.router, self.cluster_router):
                if router is not None:
                    router.client_left(event.info.client_id, event.graceful)

    def when_client_ready(self, client_id):
        """A Deferred firing once calls can be routed to ``client_id``.

        The router opens a client's upstream on the first call, so this is a
        check: it fails with CallRefused(NOT_FOUND) when the client is not connected.
        """
        if self._registry.get(client_id) is None or self._tunnels(client_id) is None:
            return fail(CallRefused(NOT_FOUND, f"client '{client_id}' is not connected"))
        return succeed(None)

    def stopService(self):
        super().stopService()
        if self.router is None:
            return None
        self._unsubscribe()
        if self._unobserve_cluster is not None:
            self._unobserve_cluster()
            self._unobserve_cluster = None
        routers = [r for r in (self.router, self.cluster_router) if r is not None]
        ports = [p for p in (self.listening_port, self.cluster_port) if p is not None]
        self.router = self.cluster_router = self.listening_port = self.cluster_port = None
        stopped = [port.stopListening() for port in ports]
        self.local.begin_shutdown()
        for router in routers:
            router.drain()
        drained = _all_closed([c for router in routers for c in router.callers])
        timer = self._reactor.callLater(self.settings.shutdown_grace, drained.cancel)

        def finish(_):
            if timer.active():
                timer.cancel()
            for router in routers:
                router.cancel_all()
            return self.local.stop(min(self.settings.shutdown_grace, 1.0))

        d = DeferredList([*stopped, drained], consumeErrors=True)
        d.addCallback(finish)
        d.addBoth(lambda result: self._runtime_dir.remove())
        d.addCallback(lambda _: self._log.info("proxy endpoint stopped"))
        return d


def _all_closed(connections):
    """A Deferred firing once every connection has closed (cancel to stop waiting)."""
    pending = [c.when_closed() for c in list(connections)]
    if not pending:
        return succeed(None)
    d = Deferred(lambda _: [p.cancel() for p in pending])
    DeferredList(pending, consumeErrors=True).addCallback(
        lambda _: d.called or d.callback(None))
    return d
