"""``twistd grpcmux-client``: the multiplexer client's options and service."""

from twisted.logger import Logger
from twisted.python import usage

from grpcmux import config
from grpcmux.tap import SettingsOptions, flag_table, option_table, make_twistd_service


class Options(SettingsOptions):
    """Flags of Go grpc-multiplexer-client v0.2.1, plus grpcmux's own."""

    synopsis = "[options]"
    longdesc = (
        "gRPC Multiplexer Client: proxy a gRPC server to a Multiplexer Server. "
        "Every option can also be set as environment variable GRPCMUX_<OPTION> "
        "(e.g. GRPCMUX_CLIENT_ID; GRPCMUX_LABEL takes k=v,k2=v2) or as a key of "
        "the YAML config file (e.g. client-id:); flags win over the environment, "
        "the environment over the file."
    )
    _config_options = config.CLIENT_OPTIONS
    _loader = staticmethod(config.load_client_settings)
    optParameters = option_table(
        config.CLIENT_OPTIONS, config.ClientSettings, config.CLIENT_FILE_STEM
    )
    optFlags = flag_table(config.CLIENT_OPTIONS)
    compData = usage.Completions(
        optActions={
            "log-level": usage.CompleteList(config.LOG_LEVELS),
            "log-format": usage.CompleteList(config.LOG_FORMATS),
            "wire-protocol": usage.CompleteList(config.WIRE_PROTOCOLS),
            "config": usage.CompleteFiles("*.yaml"),
        }
    )

    def opt_label(self, value):
        """Label key=value announced to the server (repeatable) [default: none]"""
        self.setdefault("label", []).append(value)


_log = Logger()


def make_service(settings, reactor):
    """The whole client for ``settings`` (a ClientSettings): the tunnel kept up by a
    TunnelClientService, the gRPC server's health checks and, if asked, metrics.

    The client's modules are imported here, not with the tap's options, which
    ``twistd grpcmux-client --help`` loads.
    """
    from grpcmux.addresses import client_endpoint
    from grpcmux.backend_health import BackendHealthChecker
    from grpcmux.client import Tunnel, TunnelClientService
    from grpcmux.metrics import MetricsService

    address = settings.grpc_server_address
    backend_health = BackendHealthChecker(reactor, client_endpoint(reactor, address), address)
    tunnel = Tunnel(reactor, settings, backend_health=backend_health)
    if not settings.client_id:
        _log.info("no --client-id given; using {client_id}", client_id=tunnel.client_id)
    if settings.token and not settings.tls:
        _log.warn("a token without --tls crosses the network in clear")
    service = TunnelClientService(reactor, tunnel)
    backend_health.setServiceParent(service)
    if settings.metrics_listener:
        metrics = MetricsService(reactor, settings.metrics_listener, tunnel.metrics.registry)
        metrics.setName("metrics")
        metrics.setServiceParent(service)
    return service


def makeService(options):
    """The client service for twistd (the reactor is imported only now)."""
    from twisted.internet import reactor

    return make_twistd_service(options, make_service(options.settings, reactor), reactor)
