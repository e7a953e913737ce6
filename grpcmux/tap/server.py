"""``twistd grpcmux-server``: the multiplexer server's options and service."""

from twisted.python import usage

from grpcmux import config
from grpcmux.tap import SettingsOptions, flag_table, option_table, make_twistd_service


class Options(SettingsOptions):
    """Flags of Go grpc-multiplexer-server v0.2.1, plus grpcmux's own."""

    synopsis = "[options]"
    longdesc = (
        "gRPC Multiplexer Server: access and manage multiple gRPC servers remotely. "
        "Every option can also be set as environment variable GRPCMUX_<OPTION> "
        "(e.g. GRPCMUX_PROXY_LISTENER) or as a key of the YAML config file "
        "(e.g. proxy-listener:); flags win over the environment, the environment "
        "over the file."
    )
    _config_options = config.SERVER_OPTIONS
    _loader = staticmethod(config.load_server_settings)
    optParameters = option_table(
        config.SERVER_OPTIONS, config.ServerSettings, config.SERVER_FILE_STEM
    )
    optFlags = flag_table(config.SERVER_OPTIONS)
    compData = usage.Completions(
        optActions={
            "log-level": usage.CompleteList(config.LOG_LEVELS),
            "log-format": usage.CompleteList(config.LOG_FORMATS),
            "config": usage.CompleteFiles("*.yaml"),
            "runtime-dir": usage.CompleteDirs(),
            "proxy-tls-cert": usage.CompleteFiles("*.pem"),
            "proxy-tls-key": usage.CompleteFiles("*.pem"),
            "proxy-tls-client-ca": usage.CompleteFiles("*.pem"),
            "proxy-auth-tokens": usage.CompleteFiles("*.yaml"),
        }
    )

    def postOptions(self):
        """Also read the proxy's certificate, key and token files: a bad one is a
        one-line usage error now, not a failure after twistd has daemonized."""
        super().postOptions()
        from grpcmux.rpc.security import load_proxy_security

        try:
            load_proxy_security(self.settings)
        except config.ConfigError as error:
            raise usage.UsageError(str(error))


def make_service(settings, reactor):
    """The whole server from its settings: the multiplexer endpoint, the proxy
    endpoint, the metrics endpoint if asked for, and in cluster mode the node.

    The components are built here and nowhere else: each gets the settings, and the
    security loaded from the files they name.
    """
    from grpcmux.metrics import MetricsService, ServerMetrics
    from grpcmux.open_file_limit import raise_open_file_limit
    from grpcmux.proxy import ProxyService
    from grpcmux.registry import ClientRegistry
    from grpcmux.rpc.security import load_proxy_security
    from grpcmux.server import MultiplexerServer
    from grpcmux.server_service import ServerService

    raise_open_file_limit()
    metrics = ServerMetrics()
    cluster = None
    registry = ClientRegistry()
    if settings.cluster_etcd:
        from grpcmux.cluster.node import cluster_registry

        registry = cluster = cluster_registry(settings, reactor, metrics.registry)
    multiplexer = MultiplexerServer(reactor, registry, settings, metrics=metrics,
                                    cluster_claims=cluster)
    cluster_options = {}
    if cluster is not None:
        from grpcmux.cluster.node import proxy_options

        cluster.evict = multiplexer.disconnect
        cluster_options = proxy_options(settings, reactor, cluster)
        cluster_options["cluster_health"] = cluster.add_health_observer
    proxy_security = load_proxy_security(settings)
    proxy = ProxyService(
        reactor,
        registry,
        settings,
        tunnels=multiplexer.tunnel_for,
        observer=metrics.call_finished,
        tls=proxy_security.tls,
        tokens=proxy_security.tokens,
        **cluster_options,
    )
    metrics.track_proxy(proxy)
    metrics_service = None
    if settings.metrics_listener:
        metrics_service = MetricsService(reactor, settings.metrics_listener, metrics.registry,
                                         status=metrics)
    service = ServerService(multiplexer, proxy, metrics_service)
    if cluster is not None:
        from grpcmux.cluster.node import ClusterNode

        return ClusterNode(cluster, service)
    return service


def makeService(options):
    """The server service for twistd (the reactor is imported only now)."""
    from twisted.internet import reactor

    return make_twistd_service(options, make_service(options.settings, reactor), reactor)
