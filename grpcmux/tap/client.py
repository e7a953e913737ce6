"""``twistd grpcmux-client``: the multiplexer client's options and service."""

from twisted.python import usage

from grpcmux import config
from grpcmux.tap import SettingsOptions, _flag_table, _option_table, make_twistd_service


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
    optParameters = _option_table(
        config.CLIENT_OPTIONS, config.ClientSettings, config.CLIENT_FILE_STEM
    )
    optFlags = _flag_table(config.CLIENT_OPTIONS)
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


def makeService(options):
    """The client service for twistd (the reactor is imported only now)."""
    from twisted.internet import reactor

    from grpcmux.client import make_service

    return make_twistd_service(options, make_service(options.settings, reactor), reactor)
