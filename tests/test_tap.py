"""grpcmux.tap: Options for both roles, makeService, and logging under twistd."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import Application, IService, Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, LogLevel, Logger, formatEvent
from twisted.python import usage

from grpcmux import config, tap
from grpcmux import logging as grpcmux_logging
from grpcmux.config import ClientSettings, ServerSettings
from grpcmux.tap import client as client_tap
from grpcmux.tap import server as server_tap

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dirs(tmp_path):
    home = tmp_path / "home"
    etc = tmp_path / "etc"
    home.mkdir()
    etc.mkdir()
    return home, etc


def parse(module, argv, dirs, environ=None):
    home, etc = dirs
    options = module.Options(environ=environ or {}, home=str(home), etc_dir=str(etc))
    options.parseOptions(argv)
    return options


def flat(text):
    return " ".join(text.split())


# -- Options ------------------------------------------------------------------------


SERVER_HELP = {
    "--multiplexer-listener=": "[default: localhost:7602]",
    "--proxy-listener=": "[default: localhost:7592]",
    "--authority-domain=": "[default: off]",
    "--default-client-id=": "[default: none: such calls fail]",
    "--max-message-size=": "[default: unbounded]",
    "--runtime-dir=": "[default: a private temporary directory]",
    "--handshake-timeout=": "[default: 10]",
    "--duplicate-ping-timeout=": "[default: 2]",
    "--max-clients=": "[default: 10000]",
    "--max-handshakes=": "[default: 1000]",
    "--max-streams-per-client=": "[default: 1000]",
    "--max-proxy-calls=": "[default: 10000]",
    "--max-calls-per-client=": "[default: 1000]",
    "--watch-queue-limit=": "[default: 10000]",
    "--proxy-tls-cert=": "[default: off: plaintext]",
    "--proxy-tls-key=": "[default: none]",
    "--proxy-tls-client-ca=": "[default: off]",
    "--proxy-auth-tokens=": "[default: off: every caller may call every client]",
    "--shutdown-grace=": "[default: 10]",
    "--metrics-listener=": "[default: off]",
    "--tls-cert=": "[default: no TLS]",
    "--tls-key=": "[default: none]",
    "--tls-client-ca=": "[default: no client certificates]",
    "--client-id-from-cert": "needs a client CA",
    "--auth-tokens=": "[default: no tokens]",
    "--allow-legacy-clients": "carry no credentials",
    "--cluster-etcd=": "[default: off: one server, registry in memory]",
    "--cluster-etcd-ca=": "[default: the system trust store]",
    "--cluster-etcd-cert=": "[default: none]",
    "--cluster-etcd-key=": "[default: none]",
    "--cluster-etcd-user=": "[default: none]",
    "--cluster-etcd-password-file=": "[default: none]",
    "--node-name=": "[default: the host name]",
    "--cluster-listener=": "[default: localhost:7612]",
    "--cluster-advertise=": "[default: the cluster listener's HOST:PORT]",
    "--cluster-token-file=": "[default: none]",
    "--cluster-tls-cert=": "[default: no TLS between nodes]",
    "--cluster-tls-key=": "[default: none]",
    "--cluster-tls-ca=": "[default: none]",
    "--keepalive-interval=": "[default: 30]",
    "--keepalive-timeout=": "[default: 10]",
    "--stream-window=": "[default: 1048576]",
    "--log-level=": "[default: info]",
    "--log-format=": "[default: pretty]",
    "--config=": "Default: search $HOME/.grpc-multiplexer-server.yaml, "
                 "$HOME/.grpc-multiplexer-server, /etc/grpc- "
                 "multiplexer/grpc-multiplexer-server.yaml.",
}
CLIENT_HELP = {
    "--client-id=": "[default: a random pet name]",
    "--multiplexer-address=": "[default: localhost:7602]",
    "--grpc-server-address=": "[default: localhost:7592]",
    "--label=": "(repeatable) [default: none]",
    "--wire-protocol=": "[default: native]",
    "--shutdown-grace=": "[default: 10]",
    "--metrics-listener=": "[default: off]",
    "--tls": "Connect to the multiplexer over TLS.",
    "--tls-ca=": "[default: the system trust store]",
    "--tls-server-name=": "[default: the host of the multiplexer address]",
    "--tls-cert=": "[default: none]",
    "--tls-key=": "[default: none]",
    "--token=": "prefer a token file or GRPCMUX_TOKEN",
    "--token-file=": "[default: none]",
    "--keepalive-interval=": "[default: 30]",
    "--keepalive-timeout=": "[default: 10]",
    "--stream-window=": "[default: 1048576]",
    "--log-level=": "[default: info]",
    "--log-format=": "[default: pretty]",
    "--config=": "$HOME/.grpc-",
}


@pytest.mark.parametrize(
    "module, expected", [(server_tap, SERVER_HELP), (client_tap, CLIENT_HELP)]
)
def test_help_lists_every_option_with_its_default(module, expected):
    text = str(module.Options())
    flags = {line.split()[0] for line in text.splitlines() if line.strip().startswith("--")}
    assert flags == set(expected) | {"--help", "--version"}
    # Each option's help, up to the next option, names its default.
    blocks = flat(text).split(" --")
    for flag, default in expected.items():
        block = next(b for b in blocks if b.startswith(flag[2:]))
        assert default in block, (flag, block)


def test_help_lists_every_settings_field():
    fields = {f for f in ServerSettings.__dataclass_fields__} - {"config"}
    assert {f.replace("_", "-") for f in fields} <= {
        k[2:].rstrip("=") for k in SERVER_HELP
    }
    fields = {f for f in ClientSettings.__dataclass_fields__} - {"config", "labels"}
    assert {f.replace("_", "-") for f in fields} <= {
        k[2:].rstrip("=") for k in CLIENT_HELP
    }


def test_server_flags(dirs):
    options = parse(
        server_tap,
        ["--multiplexer-listener", "tcp:7000", "--proxy-listener=[::1]:7001",
         "--authority-domain", "mux.example", "--default-client-id", "x",
         "--max-message-size", "1024", "--runtime-dir", "/run/g",
         "--handshake-timeout", "1", "--duplicate-ping-timeout", "0.5",
         "--shutdown-grace", "0", "--log-level", "debug", "--log-format", "json"],
        dirs,
    )
    assert options.settings == ServerSettings(
        multiplexer_listener="tcp:7000", proxy_listener="[::1]:7001",
        authority_domain="mux.example", default_client_id="x", max_message_size=1024,
        runtime_dir="/run/g", handshake_timeout=1.0, duplicate_ping_timeout=0.5,
        shutdown_grace=0.0, log_level="debug", log_format="json",
    )


def test_client_flags_with_repeated_label(dirs):
    options = parse(
        client_tap,
        ["--client-id", "edge-1", "--multiplexer-address", "mux:7602",
         "--grpc-server-address", "127.0.0.1:50051", "--label", "zone=eu",
         "--label", "rack=3", "--wire-protocol", "legacy", "--log-level", "error"],
        dirs,
    )
    assert options.settings == ClientSettings(
        client_id="edge-1", multiplexer_address="mux:7602",
        grpc_server_address="127.0.0.1:50051", labels=(("zone", "eu"), ("rack", "3")),
        wire_protocol="legacy", log_level="error",
    )


def test_no_flags_gives_defaults(dirs):
    assert parse(server_tap, [], dirs).settings == ServerSettings()
    assert parse(client_tap, [], dirs).settings == ClientSettings()


def test_help_defaults_do_not_mask_environment_or_file(dirs):
    home, _ = dirs
    (home / ".grpc-multiplexer-server.yaml").write_text("proxy-listener: file:1\n")
    environ = {"GRPCMUX_MULTIPLEXER_LISTENER": "env:2"}
    options = parse(server_tap, ["--log-level", "warning"], dirs, environ)
    assert options.given_flags() == {"log_level": "warning"}
    assert options.settings.proxy_listener == "file:1"
    assert options.settings.multiplexer_listener == "env:2"
    assert options.settings.config == str(home / ".grpc-multiplexer-server.yaml")


def test_flag_beats_environment_for_labels(dirs):
    options = parse(client_tap, ["--label", "a=1"], dirs, {"GRPCMUX_LABEL": "b=2"})
    assert options.settings.labels == (("a", "1"),)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (server_tap, ["--log-level", "loud"],
         "--log-level: expected one of debug, info, warning, error, got 'loud'"),
        (client_tap, ["--client-id", "a b"],
         "--client-id: expected a client id of 1-128 printable ASCII characters "
         "without whitespace or '/', got 'a b'"),
    ],
)
def test_config_error_becomes_usage_error(dirs, module, argv, message):
    with pytest.raises(usage.UsageError) as info:
        parse(module, argv, dirs)
    assert str(info.value) == message


def test_bad_file_becomes_usage_error(dirs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("shutdown-grace: later\n")
    with pytest.raises(usage.UsageError) as info:
        parse(server_tap, ["--config", str(path)], dirs)
    assert str(info.value) == (
        f"config file {path}: key 'shutdown-grace': expected a number of seconds, "
        "got a string 'later'"
    )


def test_etc_dir_default_is_read_at_parse_time(dirs, monkeypatch):
    home, etc = dirs
    (etc / "grpc-multiplexer-client.yaml").write_text("client-id: from-etc\n")
    monkeypatch.setattr(config, "DEFAULT_ETC_DIR", str(etc))
    options = client_tap.Options(environ={}, home=str(home))
    options.parseOptions([])
    assert options.settings.client_id == "from-etc"


# -- makeService ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ["server", "client"])
def test_make_service_hands_settings_and_global_reactor(dirs, monkeypatch, role):
    from twisted.internet import reactor

    module = server_tap if role == "server" else client_tap
    calls = []
    inner = Service()

    def make_service(settings, reactor):
        calls.append((settings, reactor))
        return inner

    # Each role's composition is its tap module's own.
    monkeypatch.setattr(server_tap if role == "server" else client_tap, "make_service",
                        make_service)

    options = parse(module, ["--log-level", "debug"], dirs)
    root = module.makeService(options)
    assert calls == [(options.settings, reactor)]
    assert IService.providedBy(root)
    assert list(root) == [inner]


# -- logging under twistd --------------------------------------------------------------


class FakeTwistdOptions(dict):
    """The keys of twistd's ServerOptions that decide where logs go."""


def root_for(settings, twistd_options):
    return tap.TwistdRoot(Service(), settings, twistd_options)


class SignalledReactor:
    """A reactor's signal and stop surface: startup triggers, handlers, stop."""

    def __init__(self):
        self.triggers = []
        self.stops = 0
        self.running = True

    def addSystemEventTrigger(self, phase, event, callable_):
        self.triggers.append(((phase, event), callable_))

    def callFromThread(self, f, *args):
        f(*args)

    def sigTerm(self, number, frame):
        raise AssertionError("the reactor's handler ran")

    def stop(self):
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stops += 1


def test_root_takes_the_reactors_stop_signals_so_that_twistd_exits_0(log_events):
    reactor = SignalledReactor()
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    root = tap.TwistdRoot(Service(), ClientSettings(), None, reactor)
    try:
        signal.signal(signal.SIGTERM, reactor.sigTerm)  # as the reactor installs it
        signal.signal(signal.SIGINT, signal.default_int_handler)  # not the reactor's
        root.startService()
        [(when, take)] = reactor.triggers
        assert when == ("after", "startup")
        take()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)  # again while stopping: no error
        assert reactor.stops == 1
    finally:
        root.stopService()
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert "Received SIGTERM, shutting down." in [formatEvent(e) for e in log_events]


def test_root_offers_filtered_formatted_observer_to_application(tmp_path):
    logfile = tmp_path / "twistd.log"
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        root = root_for(
            ServerSettings(log_level="warning", log_format="json"),
            FakeTwistdOptions(logfile=str(logfile), nodaemon=True),
        )
        application = Application("grpcmux-server")
        root.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        assert observer is root.observer
        assert signal.getsignal(signal.SIGUSR1) is not previous  # rotates like twistd
    finally:
        signal.signal(signal.SIGUSR1, previous)
    log = Logger(namespace="grpcmux.server", observer=observer)
    log.info("hidden")
    log.warn("client {client_id} dropped", client_id="q")
    lines = logfile.read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["client q dropped"]
    assert json.loads(lines[0])["client_id"] == "q"


def test_root_keeps_an_observer_the_application_already_has():
    application = Application("x")
    mine = grpcmux_logging.make_observer(io.StringIO())
    application.setComponent(ILogObserver, mine)
    root_for(ServerSettings(), FakeTwistdOptions(nodaemon=True)).setServiceParent(
        application
    )
    assert application.getComponent(ILogObserver) is mine


@pytest.mark.parametrize(
    "options, to_stdout",
    [
        (None, True),
        (FakeTwistdOptions(nodaemon=True, logfile=""), True),
        (FakeTwistdOptions(nodaemon=True, logfile="-"), True),
    ],
)
def test_twistd_observer_destination_stdout(capsys, options, to_stdout):
    observer = tap.twistd_observer(options, "info", "pretty")
    Logger(namespace="t", observer=observer).info("to stdout")
    assert "INF [t] to stdout" in capsys.readouterr().out


def test_twistd_observer_syslog(monkeypatch):
    from twisted.python import syslog
    from twisted.python.log import textFromEventDict

    sent = []
    monkeypatch.setattr(syslog.SyslogObserver, "__init__",
                        lambda self, prefix: sent.append(("prefix", prefix)))
    monkeypatch.setattr(syslog.SyslogObserver, "emit",
                        lambda self, event: sent.append(textFromEventDict(event)))
    observer = tap.twistd_observer(
        FakeTwistdOptions(syslog=True, prefix="mux"), "error", "json"
    )
    log = Logger(namespace="t", observer=observer)
    log.warn("filtered")
    log.error("kept")
    assert sent == [("prefix", "mux"), "kept"]


def test_root_bridges_stdlib_logging_while_running():
    import logging

    previous = logging.getLogger().level
    root = root_for(ClientSettings(log_level="debug"), None)
    root.startService()
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, grpcmux_logging.TwistedLoggerHandler)]
    assert len(handlers) == 1 and logging.getLogger().level == logging.DEBUG
    root.stopService()
    assert not any(isinstance(h, grpcmux_logging.TwistedLoggerHandler)
                   for h in logging.getLogger().handlers)
    logging.getLogger().setLevel(previous)


def test_make_twistd_service_logs_the_config_file(dirs, tmp_path):
    from twisted.logger import globalLogPublisher

    path = tmp_path / "c.yaml"
    path.write_text("client-id: a\n")
    options = parse(client_tap, ["--config", str(path)], dirs)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        tap.make_twistd_service(options, Service())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.get("config_file") for e in events if e.get("log_namespace") == "grpcmux.tap"] == [
        str(path)
    ]
    assert events[-1]["log_level"] == LogLevel.info


# -- real twistd, in a subprocess ------------------------------------------------------

TWISTD = textwrap.dedent(
    """
    import logging, sys, types
    import grpcmux
    from twisted.application.service import Service
    from twisted.logger import Logger

    class Fake(Service):
        log = Logger()

        def startService(self):
            super().startService()
            from twisted.internet import reactor
            self.log.info("info from the service")
            self.log.warn("client {client_id} is slow", client_id="zed")
            logging.getLogger("grpc").error("grpc says %s", "hello")
            reactor.callLater(0, reactor.stop)

    import grpcmux.tap.server
    grpcmux.tap.server.make_service = lambda settings, reactor: Fake()
    sys.argv = ["twistd"] + sys.argv[1:]
    from twisted.scripts.twistd import run
    run()
    """
)


def run_twistd(tmp_path, *argv, environ=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPCMUX_")}
    env.update(environ)
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + sys.path)
    return subprocess.run(
        [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def test_twistd_applies_json_format_and_level(tmp_path):
    logfile = tmp_path / "out.log"
    result = run_twistd(tmp_path, f"--logfile={logfile}", "grpcmux-server",
                        "--log-format=json", "--log-level=warning")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert [(r["level"], r["message"]) for r in records] == [
        ("warning", "client zed is slow"),
        ("error", "grpc says hello"),
    ]
    assert records[0]["client_id"] == "zed"
    assert records[1]["namespace"] == "grpc"


def test_twistd_pretty_logs_config_file_and_twistd_lines(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("log-level: info\n")
    result = run_twistd(tmp_path, "grpcmux-server", f"--config={path}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"INF [grpcmux.tap] using config file {path}" in out
    assert "INF [__main__.Fake] info from the service" in out
    assert "WRN [__main__.Fake] client zed is slow" in out
    assert "starting up" in out  # twistd's own lines take the same path


def test_twistd_explicit_logger_still_wins(tmp_path):
    (tmp_path / "mylog.py").write_text(
        "from twisted.logger import textFileLogObserver\n"
        "def observer():\n"
        "    return textFileLogObserver(open('classic.log', 'a'))\n"
    )
    result = run_twistd(tmp_path, "--logger=mylog.observer", "grpcmux-server",
                        "--log-level=error")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "classic.log").read_text()
    assert "[__main__.Fake#info] info from the service" in text  # not filtered


def test_twistd_prints_config_error_without_traceback(tmp_path):
    result = run_twistd(tmp_path, "grpcmux-server", "--log-level=loud")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "--log-level: expected one of debug, info, warning, error, got 'loud'" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("role, argv, line", [
    ("grpcmux-server", ["--log-level=loud"],
     "--log-level: expected one of debug, info, warning, error, got 'loud'"),
    ("grpcmux-server", ["--proxy-listen", "127.0.0.1:1"],
     "no such option --proxy-listen; did you mean --proxy-listener?"),
    ("grpcmux-client", ["--max-clients", "3"], "no such option --max-clients"),
])
def test_twistd_usage_error_is_one_line_and_a_pointer_to_help(tmp_path, role, argv, line):
    result = run_twistd(tmp_path, role, *argv)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"twistd {role}: {line} (see 'twistd {role} --help')\n"


@pytest.mark.parametrize("module", [server_tap, client_tap])
def test_options_take_exact_names_only(dirs, module):
    with pytest.raises(usage.UsageError) as info:
        parse(module, ["--log-lev", "debug"], dirs)
    assert str(info.value) == "no such option --log-lev; did you mean --log-level?"
    with pytest.raises(usage.UsageError, match="^no such option --shutdown; did you mean "
                                               "--shutdown-grace[?]$"):
        parse(module, ["--log-level=debug", "--shutdown", "3"], dirs)
    assert parse(module, ["--log-level=debug"], dirs).settings.log_level == "debug"


def test_a_value_that_looks_like_an_option_is_a_value(dirs):
    options = parse(server_tap, ["--default-client-id", "--proxy-listen"], dirs)
    assert options.settings.default_client_id == "--proxy-listen"


def test_unknown_grpcmux_variables_are_named_with_the_nearest_known_one():
    environ = {"GRPCMUX_PROXY_LISTNER": "x", "GRPCMUX_CLIENT_ID": "a",
               "GRPCMUX_PROXY_ADDRESS": "h:1", "GRPCMUX_GO_CACHE": "/c", "GRPCMUX_ZZZ": "1",
               "HOME": "/"}
    assert config.environment_warnings(environ) == [
        "environment variable GRPCMUX_PROXY_LISTNER is not a grpcmux setting and is "
        "ignored; did you mean GRPCMUX_PROXY_LISTENER?",
        "environment variable GRPCMUX_ZZZ is not a grpcmux setting and is ignored",
    ]


def test_twistd_warns_about_a_misspelled_variable(tmp_path):
    result = run_twistd(tmp_path, "grpcmux-server", environ={"GRPCMUX_LOG_LEVL": "debug"})
    assert result.returncode == 0, result.stderr
    assert ("WRN [grpcmux.tap] environment variable GRPCMUX_LOG_LEVL is not a grpcmux "
            "setting and is ignored; did you mean GRPCMUX_LOG_LEVEL?") in result.stdout


def test_tap_modules_import_without_grpc_or_reactor():
    code = (
        "import sys, grpcmux.tap.server, grpcmux.tap.client\n"
        "heavy = [m for m in ('grpc', 'twisted.internet.reactor', 'grpcmux.server',"
        " 'grpcmux.client') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO,
                   timeout=60)


def test_security_flags(dirs, tmp_path):
    from certs import make_pki

    pki = make_pki(tmp_path / "pki")
    options = parse(
        server_tap,
        ["--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
         "--tls-client-ca", pki.ca, "--client-id-from-cert", "--allow-legacy-clients"],
        dirs,
    )
    assert options.settings.client_id_from_cert and options.settings.allow_legacy_clients
    assert options.given_flags()["client_id_from_cert"] is True
    # An absent on/off flag leaves the environment's value alone.
    options = parse(server_tap, [], dirs, environ={"GRPCMUX_ALLOW_LEGACY_CLIENTS": "true"})
    assert options.settings.allow_legacy_clients is True
    options = parse(client_tap, ["--tls", "--tls-ca", pki.ca, "--multiplexer-address",
                                 "localhost:7602"], dirs)
    assert options.settings.tls and options.settings.server_name == "localhost"
    with pytest.raises(usage.UsageError) as info:
        parse(client_tap, ["--token", "a secret value"], dirs)
    assert "secret" not in str(info.value)
