"""grpcmux.config: validation, flag > environment > file > default, file search."""

import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpcmux import config
from grpcmux.config import (
    ClientSettings,
    ConfigError,
    ServerSettings,
    load_client_settings,
    load_server_settings,
)


@pytest.fixture
def dirs(tmp_path):
    """An empty home and etc directory: the real ones are never searched."""
    home = tmp_path / "home"
    etc = tmp_path / "etc"
    home.mkdir()
    etc.mkdir()
    return home, etc


def server(dirs, flags=None, environ=None):
    home, etc = dirs
    return load_server_settings(
        flags or {}, environ=environ or {}, home=str(home), etc_dir=str(etc)
    )


def client(dirs, flags=None, environ=None):
    home, etc = dirs
    return load_client_settings(
        flags or {}, environ=environ or {}, home=str(home), etc_dir=str(etc)
    )


def error_of(call, *args, **kwargs):
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and the contract ------------------------------------------------------


def test_server_defaults(dirs):
    assert server(dirs) == ServerSettings()
    assert dataclasses.asdict(ServerSettings()) == {
        "multiplexer_listener": "localhost:7602",
        "proxy_listener": "localhost:7592",
        "authority_domain": None,
        "default_client_id": None,
        "max_message_size": None,
        "runtime_dir": None,
        "handshake_timeout": 10.0,
        "duplicate_ping_timeout": 2.0,
        "max_clients": 10000,
        "max_handshakes": 1000,
        "max_streams_per_client": 1000,
        "max_proxy_calls": 10000,
        "max_calls_per_client": 1000,
        "watch_queue_limit": 10000,
        "proxy_tls_cert": None,
        "proxy_tls_key": None,
        "proxy_tls_client_ca": None,
        "proxy_auth_tokens": None,
        "tls_cert": None,
        "tls_key": None,
        "tls_client_ca": None,
        "client_id_from_cert": False,
        "auth_tokens": None,
        "allow_legacy_clients": False,
        "cluster_etcd": None,
        "cluster_etcd_ca": None,
        "cluster_etcd_cert": None,
        "cluster_etcd_key": None,
        "cluster_etcd_user": None,
        "cluster_etcd_password_file": None,
        "node_name": None,
        "cluster_listener": "localhost:7612",
        "cluster_advertise": None,
        "cluster_token_file": None,
        "cluster_tls_cert": None,
        "cluster_tls_key": None,
        "cluster_tls_ca": None,
        "shutdown_grace": 10.0,
        "metrics_listener": None,
        "keepalive_interval": 30.0,
        "keepalive_timeout": 10.0,
        "stream_window": 1048576,
        "log_level": "info",
        "log_format": "pretty",
        "config": None,
    }


def test_client_defaults(dirs):
    assert client(dirs) == ClientSettings()
    assert dataclasses.asdict(ClientSettings()) == {
        "client_id": None,
        "multiplexer_address": "localhost:7602",
        "grpc_server_address": "localhost:7592",
        "labels": (),
        "wire_protocol": "native",
        "tls": False,
        "tls_ca": None,
        "tls_server_name": None,
        "tls_cert": None,
        "tls_key": None,
        "token": None,
        "token_file": None,
        "shutdown_grace": 10.0,
        "metrics_listener": None,
        "keepalive_interval": 30.0,
        "keepalive_timeout": 10.0,
        "stream_window": 1048576,
        "log_level": "info",
        "log_format": "pretty",
        "config": None,
    }


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerSettings().proxy_listener = "x:1"


def test_settings_validate_on_construction():
    assert (
        error_of(ServerSettings, handshake_timeout=0)
        == "ServerSettings.handshake_timeout: expected a positive number of seconds, got 0"
    )
    assert "ClientSettings.wire_protocol: expected one of native, legacy" in error_of(
        ClientSettings, wire_protocol="grpc"
    )
    assert "ServerSettings.max_message_size: expected a whole number" in error_of(
        ServerSettings, max_message_size=1.5
    )


def test_labels_normalised_to_tuple_of_pairs():
    assert ClientSettings(labels={"a": "1", "b": "2"}).labels == (("a", "1"), ("b", "2"))
    assert ClientSettings(labels=[("a", "")]).labels == (("a", ""),)


# -- precedence ---------------------------------------------------------------------


def test_precedence_flag_env_file_default(dirs):
    home, _ = dirs
    (home / ".grpc-multiplexer-server.yaml").write_text(
        "multiplexer-listener: file:1\n"
        "proxy-listener: file:2\n"
        "handshake-timeout: 3\n"
    )
    environ = {
        "GRPCMUX_MULTIPLEXER_LISTENER": "env:1",
        "GRPCMUX_PROXY_LISTENER": "env:2",
    }
    flags = {"multiplexer_listener": "flag:1"}
    settings = server(dirs, flags, environ)
    assert settings.multiplexer_listener == "flag:1"  # flag beats env and file
    assert settings.proxy_listener == "env:2"  # env beats file
    assert settings.handshake_timeout == 3.0  # file beats default
    assert settings.shutdown_grace == 10.0  # default
    assert settings.config == str(home / ".grpc-multiplexer-server.yaml")


def test_client_precedence_including_labels(dirs, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("client-id: from-file\nlabel: {zone: a}\nwire-protocol: legacy\n")
    environ = {"GRPCMUX_CONFIG": str(path), "GRPCMUX_LABEL": "zone=b, rack=7"}
    settings = client(dirs, {"client_id": "from-flag"}, environ)
    assert settings.client_id == "from-flag"
    assert settings.labels == (("zone", "b"), ("rack", "7"))  # env replaces file
    assert settings.wire_protocol == "legacy"
    assert settings.config == str(path)
    flagged = client(dirs, {"label": ["x=1", "y=2"]}, environ)
    assert flagged.labels == (("x", "1"), ("y", "2"))


def test_empty_environment_variable_counts_as_unset(dirs):
    settings = client(dirs, environ={"GRPCMUX_CLIENT_ID": ""})
    assert settings.client_id is None


def test_other_environment_variables_are_ignored(dirs):
    assert server(dirs, environ={"GRPCMUX_CLIENT_ID": "x", "GRPCMUX_NOPE": "1"}) == (
        ServerSettings()
    )


def test_config_flag_beats_config_env(dirs, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("log-level: debug\n")
    b.write_text("log-level: error\n")
    settings = server(dirs, {"config": str(a)}, {"GRPCMUX_CONFIG": str(b)})
    assert (settings.log_level, settings.config) == ("debug", str(a))


def test_null_in_file_means_not_given(dirs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("default-client-id:\nruntime-dir: ~\n")
    settings = server(dirs, {"config": str(path)})
    assert settings.default_client_id is None and settings.runtime_dir is None


def test_empty_file_is_fine(dirs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("# nothing yet\n")
    assert server(dirs, {"config": str(path)}).config == str(path)


def test_all_server_keys_from_file(dirs, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "multiplexer-listener: unix:/run/grpcmux.sock\n"
        "proxy-listener: '[::1]:8000'\n"
        "authority-domain: Tunnel.Example.COM\n"
        "default-client-id: fallback\n"
        "max-message-size: 4194304\n"
        "runtime-dir: /run/grpcmux\n"
        "handshake-timeout: 2.5\n"
        "duplicate-ping-timeout: 1\n"
        "proxy-tls-cert: /etc/grpcmux/proxy.pem\n"
        "proxy-tls-key: /etc/grpcmux/proxy.key\n"
        "proxy-tls-client-ca: /etc/grpcmux/callers-ca.pem\n"
        "proxy-auth-tokens: /etc/grpcmux/proxy-tokens.yaml\n"
        "shutdown-grace: 0\n"
        "log-level: warning\n"
        "log-format: json\n"
    )
    assert server(dirs, {"config": str(path)}) == ServerSettings(
        multiplexer_listener="unix:/run/grpcmux.sock",
        proxy_listener="[::1]:8000",
        authority_domain="tunnel.example.com",
        default_client_id="fallback",
        max_message_size=4194304,
        runtime_dir="/run/grpcmux",
        handshake_timeout=2.5,
        duplicate_ping_timeout=1.0,
        proxy_tls_cert="/etc/grpcmux/proxy.pem",
        proxy_tls_key="/etc/grpcmux/proxy.key",
        proxy_tls_client_ca="/etc/grpcmux/callers-ca.pem",
        proxy_auth_tokens="/etc/grpcmux/proxy-tokens.yaml",
        shutdown_grace=0.0,
        log_level="warning",
        log_format="json",
        config=str(path),
    )


def test_label_list_form_in_file(dirs, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("label: [a=1, 'b=x=y']\n")
    assert client(dirs, {"config": str(path)}).labels == (("a", "1"), ("b", "x=y"))


# -- file search ------------------------------------------------------------------


def test_search_path_order(dirs):
    home, etc = dirs
    assert config.config_search_path("grpc-multiplexer-server", str(home), str(etc)) == (
        str(home / ".grpc-multiplexer-server.yaml"),
        str(home / ".grpc-multiplexer-server"),
        str(etc / "grpc-multiplexer-server.yaml"),
    )


@pytest.mark.parametrize("role", ["server", "client"])
def test_search_finds_files_in_order(dirs, role):
    home, etc = dirs
    load = server if role == "server" else client
    stem = f"grpc-multiplexer-{role}"
    files = [home / f".{stem}.yaml", home / f".{stem}", etc / f"{stem}.yaml"]
    for level, path in zip(["debug", "warning", "error"], files):
        path.write_text(f"log-level: {level}\n")
    for level, path in zip(["debug", "warning", "error"], files):
        settings = load(dirs)
        assert (settings.log_level, settings.config) == (level, str(path))
        path.unlink()
    assert load(dirs).config is None


def test_home_defaults_to_environment_home(dirs):
    home, etc = dirs
    (home / ".grpc-multiplexer-client").write_text("client-id: via-home\n")
    settings = load_client_settings({}, environ={"HOME": str(home)}, etc_dir=str(etc))
    assert settings.client_id == "via-home"


def test_no_home_searches_etc_only(dirs):
    _, etc = dirs
    (etc / "grpc-multiplexer-server.yaml").write_text("log-format: json\n")
    settings = load_server_settings({}, environ={}, etc_dir=str(etc))
    assert settings.log_format == "json"


def test_directory_named_like_a_file_is_skipped(dirs):
    home, _ = dirs
    (home / ".grpc-multiplexer-server").mkdir()
    assert server(dirs).config is None


# -- addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["localhost:7602", "127.0.0.1:1", "[::1]:7602", "[fe80::1%eth0]:80", "host.example:65535"],
)
def test_good_dial_addresses(dirs, value):
    assert client(dirs, {"multiplexer_address": value}).multiplexer_address == value


@pytest.mark.parametrize(
    "value",
    ["localhost", ":7602", "localhost:0", "localhost:65536", "::1:7602", "[::1]7602",
     "[nothost]:1", "bad_host:1", "host:port", "localhost:+1", "-x:1", ""],
)
def test_bad_dial_addresses(dirs, value):
    message = error_of(client, dirs, {"grpc_server_address": value})
    assert message.startswith("--grpc-server-address: expected HOST:PORT")
    assert message.endswith(f"got {value!r}")


@pytest.mark.parametrize("value", [":7592", "0.0.0.0:0", "[::]:7592", "localhost:7592"])
def test_good_proxy_listeners(dirs, value):
    assert server(dirs, {"proxy_listener": value}).proxy_listener == value


@pytest.mark.parametrize(
    "value",
    ["localhost:7602", "[::1]:0", "tcp:7602", "tcp:port=7602:interface=127.0.0.1",
     r"tcp6:7602:interface=\:\:1", "unix:/run/grpcmux.sock:mode=660"],
)
@pytest.mark.parametrize("key", ["multiplexer_listener", "proxy_listener"])
def test_listeners_accept_endpoint_strings(dirs, key, value):
    # The proxy endpoint is a Twisted listener too since the HTTP/2 router.
    assert getattr(server(dirs, {key: value}), key) == value


@pytest.mark.parametrize(
    "value, detail",
    [
        ("nosuch:x", "Unknown endpoint type: 'nosuch'"),
        ("tcp:notaport", "invalid literal"),
        ("systemd:domain=INET:index=0", "no such inherited socket"),
        ("localhost", ""),
    ],
)
def test_bad_multiplexer_listeners(dirs, value, detail):
    message = error_of(server, dirs, {"multiplexer_listener": value})
    assert message.startswith("--multiplexer-listener: expected HOST:PORT")
    assert detail in message


# -- other values -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "x" * 128, "client-1.eu_west~!", "Ünicode"[1:]])
def test_good_client_ids(dirs, value):
    assert client(dirs, {"client_id": value}).client_id == value


@pytest.mark.parametrize("value", ["", "x" * 129, "has space", "a/b", "tab\t", "é", "nl\n"])
def test_bad_client_ids(dirs, value):
    assert error_of(client, dirs, {"client_id": value}) == (
        "--client-id: expected a client id of 1-128 printable ASCII characters "
        f"without whitespace or '/', got {value!r}"
    )


def test_bad_default_client_id_from_env(dirs):
    assert error_of(server, dirs, environ={"GRPCMUX_DEFAULT_CLIENT_ID": "a b"}) == (
        "environment variable GRPCMUX_DEFAULT_CLIENT_ID: expected a client id of "
        "1-128 printable ASCII characters without whitespace or '/', got 'a b'"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"log_level": "trace"},
         "--log-level: expected one of debug, info, warning, error, got 'trace'"),
        ({"log_format": "xml"}, "--log-format: expected one of json, pretty, got 'xml'"),
        ({"handshake_timeout": "0"},
         "--handshake-timeout: expected a positive number of seconds, got '0'"),
        ({"handshake_timeout": "soon"},
         "--handshake-timeout: expected a number of seconds, got 'soon'"),
        ({"duplicate_ping_timeout": "nan"},
         "--duplicate-ping-timeout: expected a positive number of seconds, got 'nan'"),
        ({"shutdown_grace": "-1"},
         "--shutdown-grace: expected a number of seconds, zero or more, got '-1'"),
        ({"keepalive_interval": "0"},
         "--keepalive-interval: expected a positive number of seconds, got '0'"),
        ({"keepalive_timeout": "inf"},
         "--keepalive-timeout: expected a positive number of seconds, got 'inf'"),
        ({"stream_window": "65536"},
         "--stream-window: expected a number of bytes from 262144 (256 KiB, yamux's initial "
         "window) to 4294967295, got '65536'"),
        ({"stream_window": "4294967296"},
         "--stream-window: expected a number of bytes from 262144 (256 KiB, yamux's initial "
         "window) to 4294967295, got '4294967296'"),
        ({"max_message_size": "0"},
         "--max-message-size: expected a positive whole number, got '0'"),
        ({"max_message_size": "4MB"},
         "--max-message-size: expected a positive whole number, got '4MB'"),
        ({"authority_domain": "not a domain"},
         "--authority-domain: expected a DNS domain name such as grpcmux.example.com, "
         "got 'not a domain'"),
        ({"runtime_dir": ""}, "--runtime-dir: expected a non-empty path, got ''"),
        ({"proxy_auth_tokens": ""}, "--proxy-auth-tokens: expected a non-empty path, got ''"),
        ({"proxy_tls_key": "proxy.key"},
         "--proxy-tls-cert and --proxy-tls-key: expected both or neither"),
        ({"proxy_tls_cert": "p.pem", "proxy_tls_client_ca": "ca.pem"},
         "--proxy-tls-cert and --proxy-tls-key: expected both or neither"),
    ],
)
def test_bad_server_flags(dirs, flags, message):
    assert error_of(server, dirs, flags) == message


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"wire_protocol": "h2"}, "--wire-protocol: expected one of native, legacy, got 'h2'"),
        ({"label": ["novalue"]}, "--label: expected labels as key=value, got 'novalue'"),
        ({"label": ["a=1", "a=2"]},
         "--label: expected each label key once (key 'a' repeats), got 'a=1 a=2'"),
        ({"label": ["=v"]}, "--label: expected labels as key=value: a key of printable "
         "characters without whitespace or '=', a printable value, each at most 256 "
         "characters, got '=v'"),
    ],
)
def test_bad_client_flags(dirs, flags, message):
    assert error_of(client, dirs, flags) == message


def test_bad_env_names_variable(dirs):
    assert error_of(client, dirs, environ={"GRPCMUX_LABEL": "a"}) == (
        "environment variable GRPCMUX_LABEL: expected labels as key=value, got 'a'"
    )


# -- file errors: one line naming file, key, expectation -------------------------------


def write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("proxy-listener: nowhere\n",
         "key 'proxy-listener': expected HOST:PORT (IPv6 hosts in brackets, e.g. "
         "[::1]:7602), got 'nowhere'"),
        ("proxy-listener: 7592\n",
         "key 'proxy-listener': expected HOST:PORT (IPv6 hosts in brackets, e.g. "
         "[::1]:7602), as a string, got a whole number 7592"),
        ("default-client-id: yes\n",
         "key 'default-client-id': expected a string, got a boolean True"),
        ("handshake-timeout: '10'\n",
         "key 'handshake-timeout': expected a number of seconds, got a string"),
        ("handshake-timeout: true\n",
         "key 'handshake-timeout': expected a number of seconds, got a boolean"),
        ("max-message-size: 1.5\n",
         "key 'max-message-size': expected a positive whole number, got a number"),
        ("max-message-size: -3\n",
         "key 'max-message-size': expected a positive whole number, got -3"),
        ("log-level: verbose\n",
         "key 'log-level': expected one of debug, info, warning, error, got 'verbose'"),
        ("proxy_listener: x:1\n",
         "unknown key 'proxy_listener'; expected one of: allow-legacy-clients, "
         "auth-tokens, authority-domain, client-id-from-cert, cluster-advertise, "),
        ("config: other.yaml\n", "unknown key 'config'"),
        ("- a\n- b\n",
         "expected a mapping of option names to values at the top level, got a list"),
        ("log-level: [debug\n", "expected valid YAML, syntax error at line 2, column 1"),
        ("log-level: info\nlog-level: debug\n",
         "expected valid YAML, syntax error at line 2, column 1: key 'log-level' "
         "appears twice"),
        ("proxy-listener: a:1\n  bad: indent\n",
         "expected valid YAML, syntax error at line 2, column 6: mapping values are "
         "not allowed here"),
    ],
)
def test_server_file_errors(dirs, tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(server, dirs, {"config": str(path)})
    assert message.startswith(f"config file {path}: ")
    assert expected in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("label: a=1\n",
         "key 'label': expected a mapping of label keys to values or a list of "
         "key=value strings, got a string"),
        ("label: {a: [1]}\n",
         "key 'label': expected a mapping of label keys to text values, got a list for 'a'"),
        ("label: [a]\n", "key 'label': expected labels as key=value, got ['a']"),
        ("client-id: a/b\n", "key 'client-id': expected a client id of 1-128"),
        ("multiplexer-address: '[::1]'\n", "key 'multiplexer-address': expected HOST:PORT"),
        ("labels: {a: b}\n", "unknown key 'labels'; expected one of: client-id, "
         "grpc-server-address, keepalive-interval, keepalive-timeout, label, "
         "log-format, log-level, metrics-listener, multiplexer-address, "),
    ],
)
def test_client_file_errors(dirs, tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(client, dirs, {"config": str(path)})
    assert message.startswith(f"config file {path}: ")
    assert expected in message


def test_label_numbers_in_file_become_text(dirs, tmp_path):
    path = write(tmp_path, "label: {version: 2, ratio: 0.5}\n")
    assert client(dirs, {"config": str(path)}).labels == (
        ("version", "2"), ("ratio", "0.5"),
    )


def test_missing_named_file(dirs, tmp_path):
    path = tmp_path / "absent.yaml"
    assert error_of(server, dirs, {"config": str(path)}) == (
        f"config file {path}: cannot be read: No such file or directory"
    )


def test_unreadable_found_file_is_reported(dirs):
    home, _ = dirs
    path = home / ".grpc-multiplexer-server.yaml"
    path.write_text(": : :\n")
    message = error_of(server, dirs)
    assert message.startswith(f"config file {path}: expected valid YAML")


def test_found_file_with_bad_value_names_it(dirs):
    _, etc = dirs
    path = etc / "grpc-multiplexer-client.yaml"
    path.write_text("wire-protocol: http\n")
    assert error_of(client, dirs) == (
        f"config file {path}: key 'wire-protocol': expected one of native, legacy, "
        "got 'http'"
    )


def test_unknown_flag_name_is_a_programming_error(dirs):
    with pytest.raises(TypeError):
        server(dirs, {"nope": "1"})


def test_default_of():
    option = next(o for o in config.CLIENT_OPTIONS if o.flag == "label")
    assert config.default_of(ClientSettings, option) == ()


def test_environ_defaults_to_os_environ(dirs, monkeypatch):
    home, etc = dirs
    monkeypatch.setenv("GRPCMUX_SHUTDOWN_GRACE", "1.5")
    settings = load_server_settings({}, home=str(home), etc_dir=str(etc))
    assert settings.shutdown_grace == 1.5
    assert os.environ["GRPCMUX_SHUTDOWN_GRACE"] == "1.5"


# -- the shipped examples ---------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


@pytest.mark.parametrize(
    "role, options, load",
    [
        ("server", config.SERVER_OPTIONS, load_server_settings),
        ("client", config.CLIENT_OPTIONS, load_client_settings),
    ],
)
def test_examples_load_and_name_every_key(dirs, role, options, load):
    home, etc = dirs
    path = os.path.join(EXAMPLES, f"grpcmux-{role}.yaml")
    with open(path) as stream:
        keys = {line.split(":")[0] for line in stream if line[:1].isalpha()}
    assert keys == {o.flag for o in options} - {"config"}
    settings = load({"config": path}, environ={}, home=str(home), etc_dir=str(etc))
    assert settings.config == path


# -- properties ------------------------------------------------------------------------

@given(st.text(min_size=1, max_size=140))
def test_client_id_rule(text):
    ok = len(text) <= 128 and all(33 <= ord(c) <= 126 and c != "/" for c in text)
    try:
        ClientSettings(client_id=text)
    except ConfigError:
        assert not ok
    else:
        assert ok


# -- limits ------------------------------------------------------------------------------

LIMITS = ("max_clients", "max_handshakes", "max_streams_per_client", "max_proxy_calls",
          "max_calls_per_client", "watch_queue_limit")


@pytest.mark.parametrize("attr", LIMITS)
def test_limits_from_flag_env_and_file(dirs, tmp_path, attr):
    flag = attr.replace("_", "-")
    path = tmp_path / "s.yaml"
    path.write_text(f"{flag}: 3\n")
    assert getattr(server(dirs, {"config": str(path)}), attr) == 3
    environ = {f"GRPCMUX_{attr.upper()}": "4"}
    assert getattr(server(dirs, {"config": str(path)}, environ), attr) == 4
    assert getattr(server(dirs, {"config": str(path), attr: "5"}, environ), attr) == 5


@pytest.mark.parametrize("attr", LIMITS)
def test_bad_limits_are_one_line_errors(dirs, tmp_path, attr):
    flag = attr.replace("_", "-")
    assert error_of(server, dirs, {attr: "0"}) == (
        f"--{flag}: expected a positive whole number, got '0'")
    assert error_of(server, dirs, environ={f"GRPCMUX_{attr.upper()}": "many"}) == (
        f"environment variable GRPCMUX_{attr.upper()}: expected a positive whole number, "
        "got 'many'")
    path = tmp_path / "s.yaml"
    path.write_text(f"{flag}: 1.5\n")
    assert error_of(server, dirs, {"config": str(path)}).endswith(
        f"key '{flag}': expected a positive whole number, got a number 1.5")
    assert error_of(ServerSettings, **{attr: -1}) == (
        f"ServerSettings.{attr}: expected a positive whole number, got -1")


# -- security settings (docs/security.rst) -------------------------------------------


def test_server_security_from_flags_environment_and_file(dirs, tmp_path, pki):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("edge-1: " + "ab" * 32 + "\n")
    path = write(tmp_path, f"tls-cert: {pki.server.cert}\ntls-key: {pki.server.key}\n"
                           "allow-legacy-clients: true\n")
    settings = server(
        dirs, {"config": str(path), "client_id_from_cert": True},
        environ={"GRPCMUX_TLS_CLIENT_CA": pki.ca, "GRPCMUX_AUTH_TOKENS": str(tokens)},
    )
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        pki.server.cert, pki.server.key, pki.ca)
    assert settings.client_id_from_cert and settings.allow_legacy_clients
    assert settings.auth_tokens == str(tokens)


@pytest.mark.parametrize("text, expected", [
    ("yes", True), ("1", True), ("ON", True), ("false", False), ("0", False), ("no", False),
])
def test_boolean_from_the_environment(dirs, text, expected):
    settings = server(dirs, environ={"GRPCMUX_ALLOW_LEGACY_CLIENTS": text})
    assert settings.allow_legacy_clients is expected


def test_boolean_errors(dirs, tmp_path):
    message = error_of(server, dirs, environ={"GRPCMUX_ALLOW_LEGACY_CLIENTS": "maybe"})
    assert message == ("environment variable GRPCMUX_ALLOW_LEGACY_CLIENTS: expected true "
                       "or false (also 1/0, yes/no, on/off), got 'maybe'")
    path = write(tmp_path, "client-id-from-cert: 'yes'\n")
    message = error_of(server, dirs, {"config": str(path)})
    assert "key 'client-id-from-cert': expected true or false, got a string 'yes'" in message


@pytest.mark.parametrize("fields, expected", [
    ({"tls_cert": "c"}, "--tls-cert and --tls-key: expected both or neither"),
    ({"tls_client_ca": "ca"}, "--tls-client-ca: expected --tls-cert and --tls-key as well"),
    ({"client_id_from_cert": True}, "--client-id-from-cert: expected --tls-client-ca"),
    ({"auth_tokens": "/nonexistent/tokens.yaml"},
     "/nonexistent/tokens.yaml: cannot be read"),
    ({"tls_cert": "/nonexistent/s.crt", "tls_key": "/nonexistent/s.key"},
     "--tls-cert /nonexistent/s.crt: cannot be read"),
])
def test_server_security_errors(fields, expected):
    with pytest.raises(ConfigError) as info:
        ServerSettings(**fields)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_client_tls_settings(pki):
    settings = ClientSettings(multiplexer_address="mux.example.com:7602", tls=True,
                              tls_ca=pki.ca, tls_cert=pki.client.cert,
                              tls_key=pki.client.key)
    assert settings.server_name == "mux.example.com"
    assert ClientSettings(multiplexer_address="[::1]:7602", tls=True).server_name == "::1"
    named = ClientSettings(multiplexer_address="unix:/run/mux.sock", tls=True,
                           tls_server_name="Mux.Example.com.")
    assert named.server_name == "mux.example.com"


@pytest.mark.parametrize("fields, expected", [
    ({"tls_ca": "ca.crt"}, "--tls-ca: expected --tls as well"),
    ({"tls_server_name": "a.example"}, "--tls-server-name: expected --tls as well"),
    ({"tls": True, "tls_cert": "c"}, "--tls-cert and --tls-key: expected both or neither"),
    ({"tls": True, "multiplexer_address": "unix:/run/mux.sock"},
     "--tls-server-name: expected a name to verify the server with"),
    ({"tls": True, "tls_server_name": "not a name"}, "expected a DNS domain name"),
    ({"tls": True, "tls_ca": "/nonexistent/ca.crt"}, "--tls-ca /nonexistent/ca.crt: cannot"),
])
def test_client_security_errors(fields, expected):
    with pytest.raises(ConfigError) as info:
        ClientSettings(**fields)
    assert expected in str(info.value) and "\n" not in str(info.value)
def test_keepalive_and_window_settings_reach_both_sessions(reactor):
    from grpcmux.tap import client as client_tap
    from grpcmux.tap.server import make_service

    server = make_service(
        ServerSettings(keepalive_interval=0.5, keepalive_timeout=0.25, stream_window=524288),
        reactor,
    )
    config_ = server.multiplexer.yamux_config
    assert (config_.keepalive_interval, config_.connection_write_timeout) == (0.5, 0.25)
    assert config_.max_stream_window_size == 524288
    client = client_tap.make_service(
        ClientSettings(client_id="c", keepalive_interval=2, keepalive_timeout=1), reactor
    )
    config_ = client.tunnel.yamux_config
    assert (config_.keepalive_interval, config_.connection_write_timeout) == (2.0, 1.0)
    assert config_.max_stream_window_size == 1024 * 1024


def test_yamux_config_is_derived_from_the_settings():
    config_ = ClientSettings(keepalive_interval=3, keepalive_timeout=2,
                             stream_window=524288).yamux_config(max_streams=7)
    assert (config_.keepalive_interval, config_.connection_write_timeout) == (3.0, 2.0)
    assert (config_.max_stream_window_size, config_.max_streams) == (524288, 7)
    assert config_.stream_open_timeout == 75.0  # not a setting: yamux's own


# -- several multiplexer addresses (issue 13) ---------------------------------------


def test_multiplexer_addresses_from_flag_environment_and_file(dirs, tmp_path):
    flagged = client(dirs, {"multiplexer_address": "a.example:1, 127.0.0.1:2,[::1]:3"})
    assert flagged.multiplexer_address == "a.example:1,127.0.0.1:2,[::1]:3"
    assert flagged.multiplexer_addresses == ("a.example:1", "127.0.0.1:2", "[::1]:3")
    from_env = client(dirs, environ={"GRPCMUX_MULTIPLEXER_ADDRESS": "x.example:7602,y:7602"})
    assert from_env.multiplexer_addresses == ("x.example:7602", "y:7602")
    listed = write(tmp_path, "multiplexer-address:\n  - one.example:7602\n  - unix:/run/m\n")
    assert client(dirs, {"config": str(listed)}).multiplexer_addresses == (
        "one.example:7602", "unix:/run/m")
    text = write(tmp_path, "multiplexer-address: 'p:1,q:2'\n")
    assert client(dirs, {"config": str(text)}).multiplexer_addresses == ("p:1", "q:2")
    assert client(dirs).multiplexer_addresses == ("localhost:7602",)


@pytest.mark.parametrize("value, detail", [
    ("a:1,,b:2", "none empty"),
    ("a:1,", "none empty"),
    (" , ", "none empty"),
    ("a:1,a:1", "addresses that are all different"),
    ("a:1,b", "for each address ('b' is not)"),
])
def test_bad_multiplexer_address_lists(dirs, value, detail):
    message = error_of(client, dirs, {"multiplexer_address": value})
    assert message.startswith("--multiplexer-address: expected ")
    assert detail in message and message.endswith(f"got {value!r}")


@pytest.mark.parametrize("text, expected", [
    ("multiplexer-address: []\n", "key 'multiplexer-address': expected a list of addresses"),
    ("multiplexer-address: [a:1, 7]\n",
     "key 'multiplexer-address': expected a list of addresses as strings, got ['a:1', 7]"),
    ("multiplexer-address: [a:1, nowhere]\n",
     "key 'multiplexer-address': expected HOST:PORT"),
])
def test_bad_multiplexer_address_lists_in_file(dirs, tmp_path, text, expected):
    path = write(tmp_path, text)
    assert expected in error_of(client, dirs, {"config": str(path)})


def test_tls_names_each_server_by_its_own_host(dirs, pki):
    settings = client(dirs, {"multiplexer_address": "a.example:1,b.example:2,a.example:3",
                             "tls": True, "tls_ca": pki.ca})
    assert settings.server_name_for("b.example:2") == "b.example"
    assert set(settings.tls_creators) == {"a.example", "b.example"}
    assert settings.tls_creator_for("a.example:3") is settings.tls_creator
    named = client(dirs, {"multiplexer_address": "10.0.0.1:1,unix:/run/m", "tls": True,
                          "tls_ca": pki.ca, "tls_server_name": "mux.example"})
    assert set(named.tls_creators) == {"mux.example"}
    message = error_of(client, dirs, {"multiplexer_address": "a.example:1,unix:/run/m",
                                      "tls": True, "tls_ca": pki.ca})
    assert message.startswith("--tls-server-name: expected a name")
