"""ProxyService: the Twisted service owning the proxy endpoint's grpc server.

Every grpc object is made in startService, which twistd calls after it forked (grpc
does not survive a fork). The server runs on grpcio's own threads; the reactor only
hands it registry changes and waits for its stop through a Deferred.
"""

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import DISCONNECTED
from grpcmux.rpc.discovery import DiscoveryServicer
from grpcmux.rpc.proxy import HandlerTable, TransparentProxy, message_size_options
from grpcmux.rpc.threads import defer_to_thread

DISCOVERY_SERVICE = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name


class ProxyService(Service):
    """The proxy endpoint: Discovery, health, reflection, and forwarding to clients.

    ``max_concurrent_calls`` bounds the calls in progress (each holds a grpc worker
    thread); calls beyond it fail with RESOURCE_EXHAUSTED instead of queueing.
    ``shutdown_grace`` is how long stopService lets running calls finish.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        registry,
        listen_address: str,
        authority_domain=None,
        default_client_id=None,
        max_message_size=None,
        max_concurrent_calls=1000,
        shutdown_grace=10.0,
    ):
        self._reactor = reactor
        self._registry = registry
        self.listen_address = listen_address
        self.authority_domain = authority_domain
        self.default_client_id = default_client_id
        self.max_message_size = max_message_size
        self.max_concurrent_calls = max_concurrent_calls
        self.shutdown_grace = shutdown_grace
        self.port = None
        self._server = None
        self._proxy = None
        self._discovery = None
        self._health = None
        self._unsubscribe = None

    def startService(self):
        discovery = DiscoveryServicer(self._reactor, self._registry)
        health_servicer = health.HealthServicer()
        always, unrouted = HandlerTable(), HandlerTable()
        discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(discovery, always)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, unrouted)
        reflection.enable_server_reflection(
            [DISCOVERY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], unrouted
        )
        proxy = TransparentProxy(
            self._registry,
            authority_domain=self.authority_domain,
            default_client_id=self.default_client_id,
            max_message_size=self.max_message_size,
            local=always.handlers,
            local_unrouted=unrouted.handlers,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(self.max_concurrent_calls, "grpcmux-proxy"),
            handlers=[proxy],
            options=message_size_options(self.max_message_size),
            maximum_concurrent_rpcs=self.max_concurrent_calls,
        )
        try:
            port = server.add_insecure_port(self.listen_address)
        except RuntimeError as e:  # grpcio's only word on a failed bind
            raise OSError(f"proxy endpoint cannot listen on {self.listen_address!r}") from e
        server.start()
        for name in ("", DISCOVERY_SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._proxy, self._discovery, self._health = (
            server, proxy, discovery, health_servicer)
        self._unsubscribe = self._registry.subscribe(self._registry_changed)
        self.port = port
        super().startService()
        self._log.info("proxy endpoint listening on {address} (port {port})",
                       address=self.listen_address, port=port)

    def _registry_changed(self, event):
        if event.kind == DISCONNECTED:
            # Closing a channel takes grpc locks: not on the reactor thread.
            self._reactor.callInThread(self._proxy.client_gone, event.info)

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return
        self._unsubscribe()
        self._health.enter_graceful_shutdown()
        self._discovery.close()  # Watch streams never end by themselves
        # stop() cancels what is still running once the grace period is over.
        stopped = server.stop(self.shutdown_grace)
        proxy, timeout = self._proxy, self.shutdown_grace + 5.0

        def finish():
            done = stopped.wait(timeout)
            proxy.close()
            return done

        if not (yield defer_to_thread(self._reactor, finish)):
            self._log.warn("proxy endpoint did not stop within {timeout} s", timeout=timeout)
        self._log.info("proxy endpoint stopped")
