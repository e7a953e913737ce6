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


def makeService(options):
    """The server service for twistd (the reactor is imported only now)."""
    from twisted.internet import reactor

    from grpcmux.server import make_service

    return make_twistd_service(options, make_service(options.settings, reactor), reactor)
