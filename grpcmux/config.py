"""Settings of the multiplexer server and client, and where they come from.

Every option can be given, from strongest to weakest, as a command-line flag, as an
environment variable ``GRPCMUX_<FLAG>`` (``--proxy-listener`` ->
``GRPCMUX_PROXY_LISTENER``), as a key of a YAML file named like the long flag
(``proxy-listener:``), or left at its default.  Any bad value raises one
:class:`ConfigError` whose one-line message names where the value came from, the
option and what was expected, so ``twistd`` can print it as a usage error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from grpcmux import addresses
from grpcmux.addresses import AddressError
from grpcmux.ids import MAX_CLIENT_ID_LENGTH, client_id_problem
from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.frame import INITIAL_STREAM_WINDOW, MAX_STREAM_WINDOW

ENV_PREFIX = "GRPCMUX_"
DEFAULT_ETC_DIR = "/etc/grpc-multiplexer"
SERVER_FILE_STEM = "grpc-multiplexer-server"
CLIENT_FILE_STEM = "grpc-multiplexer-client"

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "pretty")
WIRE_PROTOCOLS = ("native", "legacy")
MAX_LABEL_PART_LENGTH = 256


class ConfigError(ValueError):
    """A setting is invalid; ``str(error)`` is one line naming source, key, expectation."""


class _Invalid(ValueError):
    """Raised by the value checkers with the 'expected ...' text."""


# -- value checkers: typed value in, normalised value out, _Invalid on error --------

def _address_check(check):
    """Adapt an ``addresses`` checker to the _Invalid convention of this module."""

    def checked(value: str) -> str:
        try:
            return check(value)
        except AddressError as error:
            raise _Invalid(str(error)) from None

    return checked


_check_dial_address = _address_check(addresses.check_dial_address)


def _check_dial_addresses(value: str) -> str:
    """One address to dial or several, comma-separated; normalised to ``a,b``."""
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise _Invalid("one HOST:PORT (or unix:PATH) or several, separated by commas, "
                       "none empty")
    if len(set(parts)) != len(parts):
        raise _Invalid("addresses that are all different")
    for part in parts:
        try:
            _check_dial_address(part)
        except _Invalid as error:
            if len(parts) == 1:
                raise
            raise _Invalid(f"{error}, for each address ({part!r} is not)") from None
    return ",".join(parts)


_check_multiplexer_listener = _address_check(addresses.check_server_endpoint)


def _check_client_id(value: str) -> str:
    if client_id_problem(value) is not None:
        raise _Invalid(
            f"a client id of 1-{MAX_CLIENT_ID_LENGTH} printable ASCII characters "
            "without whitespace or '/'"
        )
    return value


def _check_domain(value: str) -> str:
    if not addresses.is_hostname(value.strip(".")) or value != value.strip():
        raise _Invalid("a DNS domain name such as grpcmux.example.com")
    return value.strip(".").lower()


def _check_domain_or_ip(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return _check_domain(value)


def _check_etcd_urls(value: str) -> str:
    from grpcmux.cluster.etcd import parse_endpoints

    try:
        parse_endpoints(value)
    except ValueError as error:
        raise _Invalid(f"etcd client URLs http(s)://HOST:PORT, comma-separated ({error})")
    return value


def _check_node_name(value: str) -> str:
    if client_id_problem(value) is not None:
        raise _Invalid(
            f"a node name of 1-{MAX_CLIENT_ID_LENGTH} printable ASCII characters "
            "without whitespace or '/'"
        )
    return value


def _check_path(value: str) -> str:
    if not value or "\0" in value:
        raise _Invalid("a non-empty path")
    return value


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise _Invalid("one of " + ", ".join(choices))
        return value

    return check


def _positive_int(value: int) -> int:
    if value <= 0:
        raise _Invalid("a positive whole number")
    return value


def _non_negative_int(value: int) -> int:
    if value < 0:
        raise _Invalid("a whole number, zero or more")
    return value


def _stream_window(value: int) -> int:
    if not INITIAL_STREAM_WINDOW <= value <= MAX_STREAM_WINDOW:
        raise _Invalid(f"a number of bytes from {INITIAL_STREAM_WINDOW} (256 KiB, yamux's "
                       f"initial window) to {MAX_STREAM_WINDOW}")
    return value


def _number(minimum_exclusive: bool) -> Callable[[float], float]:
    def check(value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
            raise _Invalid(
                "a positive number of seconds"
                if minimum_exclusive
                else "a number of seconds, zero or more"
            )
        return value

    return check


def _check_label_pair(key: str, value: str) -> Tuple[str, str]:
    expected = (
        "labels as key=value: a key of printable characters without whitespace "
        f"or '=', a printable value, each at most {MAX_LABEL_PART_LENGTH} characters"
    )
    if (
        not key
        or len(key) > MAX_LABEL_PART_LENGTH
        or len(value) > MAX_LABEL_PART_LENGTH
        or not key.isprintable()
        or any(c.isspace() or c == "=" for c in key)
        or not value.isprintable()
    ):
        raise _Invalid(expected)
    return key, value


def _check_labels(pairs: Any) -> Tuple[Tuple[str, str], ...]:
    """Normalise a mapping or a sequence of (key, value) pairs to a tuple of pairs."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    result = []
    seen = set()
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise _Invalid("labels as (key, value) pairs")
        if not isinstance(key, str) or not isinstance(value, str):
            raise _Invalid("labels with string keys and values")
        pair = _check_label_pair(key, value)
        if key in seen:
            raise _Invalid(f"each label key once (key {key!r} repeats)")
        seen.add(key)
        result.append(pair)
    return tuple(result)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool_from_text(text: Any) -> bool:
    """A flag given on the command line (True) or a boolean environment value."""
    if isinstance(text, bool):
        return text
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise _Invalid("true or false (also 1/0, yes/no, on/off)")
    return word in _TRUE


def _check_token(value: str) -> str:
    if not value or not value.isprintable() or any(c.isspace() for c in value):
        raise _Invalid("a token of printable characters without whitespace")
    return value


def _shown(option: "_Option", value: Any) -> str:
    """A rejected value as an error message may show it: secrets are not shown."""
    return "a value that is not shown" if option.secret else repr(value)


def _split_label(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise _Invalid("labels as key=value")
    return key, value


# -- option table ------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One option: its flag name, the value kind, the checker, the help text."""

    flag: str
    kind: str  # "str", "int", "float", "bool", "labels", "addresses" (comma list or YAML list)
    check: Callable[[Any], Any]
    help: str
    optional: bool = False  # None is a valid value (the default)
    shown_default: Optional[str] = None  # how --help describes a None default
    secret: bool = False  # never echoed in an error message

    @property
    def attr(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()


def _from_text(option: _Option, text: Any) -> Any:
    """Convert a flag or environment value (text; a list for repeated --label)."""
    if option.kind == "labels":
        parts = text if isinstance(text, (list, tuple)) else text.split(",")
        return option.check([_split_label(p.strip()) for p in parts if p.strip()])
    if option.kind == "bool":
        return _bool_from_text(text)
    if option.kind == "int":
        if not text.strip().isdigit():
            raise _Invalid(_int_expected(option))
        return option.check(int(text))
    if option.kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise _Invalid("a number of seconds")
        return option.check(number)
    return option.check(text)


def _int_expected(option: _Option) -> str:
    """What a whole-number option expects, in its own check's words."""
    try:
        option.check(-1)
    except _Invalid as error:
        return str(error)
    return "a whole number"


def _yaml_type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a whole number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _from_yaml(option: _Option, value: Any) -> Any:
    """Check and convert a typed YAML value (no silent string/number coercion)."""
    if option.kind == "labels":
        if isinstance(value, dict):
            pairs = []
            for key, item in value.items():
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise _Invalid(
                        "a mapping of label keys to text values, "
                        f"got {_yaml_type_name(item)} for {key!r}"
                    )
                pairs.append((str(key), str(item)))
            return option.check(pairs)
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            return option.check([_split_label(p) for p in value])
        raise _Invalid(
            "a mapping of label keys to values or a list of key=value strings, "
            f"got {_yaml_type_name(value)} {value!r}"
        )
    if option.kind == "bool":
        if not isinstance(value, bool):
            raise _Invalid(f"true or false, got {_yaml_type_name(value)} {value!r}")
        return value
    if option.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(
                f"{_int_expected(option)}, got {_yaml_type_name(value)} {value!r}"
            )
        return option.check(value)
    if option.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"a number of seconds, got {_yaml_type_name(value)} {value!r}")
        return option.check(value)
    if option.kind == "addresses" and isinstance(value, list):
        if not value or not all(isinstance(item, str) for item in value):
            raise _Invalid(f"a list of addresses as strings, got {value!r}")
        return option.check(",".join(value))
    if not isinstance(value, str) and option.secret:
        raise _Invalid(f"a string, got {_yaml_type_name(value)}")
    if not isinstance(value, str):
        try:
            option.check(str(value))
        except _Invalid as error:
            expected = f"{error}, as a string"
        else:
            expected = "a string"
        raise _Invalid(f"{expected}, got {_yaml_type_name(value)} {value!r}")
    return option.check(value)


_LOG_OPTIONS = (
    _Option("log-level", "str", _choice(LOG_LEVELS),
            'Log level: "debug", "info", "warning" or "error".'),
    _Option("log-format", "str", _choice(LOG_FORMATS),
            'Log format: "json" (one object per line) or "pretty".'),
)
_METRICS_OPTION = _Option(
    "metrics-listener", "str", _check_multiplexer_listener,
    "Serve Prometheus metrics over HTTP at /metrics on HOST:PORT or a Twisted "
    "endpoint (tcp:..., unix:...).", optional=True, shown_default="off",
)
_SHUTDOWN_OPTION = _Option(
    "shutdown-grace", "float", _number(False),
    "Seconds the calls in flight get to finish on shutdown.",
)
# Liveness of the multiplexer connection (yamux pings), on both sides.
_KEEPALIVE_OPTIONS = (
    _Option("keepalive-interval", "float", _number(True),
            "Seconds between keepalive pings on the multiplexer connection."),
    _Option("keepalive-timeout", "float", _number(True),
            "Seconds a keepalive ping may go unanswered before the connection is "
            "dropped (the client then reconnects)."),
    _Option("stream-window", "int", _stream_window,
            "Receive window of each yamux stream in bytes, advertised to the peer "
            "when the stream opens: how much one stream may have in flight, and "
            "buffer here when its reader is slow."),
)
_CONFIG_OPTION = _Option(
    "config", "str", _check_path,
    "Config file (YAML). Default: search $HOME/.{stem}.yaml, $HOME/.{stem}, "
    "{etc}/{stem}.yaml.",
    optional=True,
)

_LIMIT_OPTIONS = (
    _Option("max-clients", "int", _positive_int,
            "Most multiplexer clients connected at once; more are refused "
            "(RESOURCE_EXHAUSTED)."),
    _Option("max-handshakes", "int", _positive_int,
            "Most multiplexer connections still in their handshake; further ones "
            "wait in the listen backlog until one finishes."),
    _Option("max-streams-per-client", "int", _positive_int,
            "Most yamux streams open at once in one client's session; more are "
            "reset or fail."),
    _Option("max-proxy-calls", "int", _positive_int,
            "Most calls in progress on the proxy endpoint; more fail with "
            "RESOURCE_EXHAUSTED."),
    _Option("max-calls-per-client", "int", _positive_int,
            "Most proxied calls in progress to one client; more fail with "
            "RESOURCE_EXHAUSTED."),
    _Option("watch-queue-limit", "int", _positive_int,
            "Discovery events kept for Watch callers: one that falls further behind "
            "is ended with RESOURCE_EXHAUSTED (watch again with replay)."),
)

# Security of the multiplexer endpoint (docs/security.rst).
_SERVER_SECURITY_OPTIONS = (
    _Option("tls-cert", "str", _check_path,
            "TLS certificate (PEM, leaf first, then intermediates) for the multiplexer "
            "endpoint; with its key the listener speaks TLS.", optional=True,
            shown_default="no TLS"),
    _Option("tls-key", "str", _check_path,
            "Private key (PEM) of the TLS certificate.", optional=True),
    _Option("tls-client-ca", "str", _check_path,
            "CA certificate(s) (PEM) that must have signed every client's certificate "
            "(mTLS).", optional=True, shown_default="no client certificates"),
    _Option("client-id-from-cert", "bool", bool,
            "A client may only use an id that is a DNS name of its certificate (its CN "
            "when it has none); needs a client CA."),
    _Option("auth-tokens", "str", _check_path,
            "YAML file mapping client ids or glob patterns to SHA-256 digests of "
            "tokens; clients must send a matching token.", optional=True,
            shown_default="no tokens"),
    _Option("allow-legacy-clients", "bool", bool,
            "Admit legacy (Go v0.2.1) clients, which carry no credentials, even when "
            "tokens or client certificates are required."),
)
_CLIENT_SECURITY_OPTIONS = (
    _Option("tls", "bool", bool, "Connect to the multiplexer over TLS."),
    _Option("tls-ca", "str", _check_path,
            "CA certificate(s) (PEM) to verify the server with.", optional=True,
            shown_default="the system trust store"),
    _Option("tls-server-name", "str", _check_domain_or_ip,
            "Name the server's certificate must carry.", optional=True,
            shown_default="the host of the multiplexer address"),
    _Option("tls-cert", "str", _check_path,
            "Client certificate (PEM) for servers that require one.", optional=True),
    _Option("tls-key", "str", _check_path,
            "Private key (PEM) of the client certificate.", optional=True),
    _Option("token", "str", _check_token,
            "Token sent to the server. A token on the command line shows in ps: "
            "prefer a token file or GRPCMUX_TOKEN.", optional=True, secret=True),
    _Option("token-file", "str", _check_path,
            "File holding the token sent to the server.", optional=True),
)

# Cluster mode (docs/cluster.rst): several servers share one registry in etcd.
_CLUSTER_OPTIONS = (
    _Option("cluster-etcd", "str", _check_etcd_urls,
            "etcd client URLs (http(s)://HOST:PORT, comma-separated): turns cluster "
            "mode on, the registry of connected clients is shared through etcd.",
            optional=True, shown_default="off: one server, registry in memory"),
    _Option("cluster-etcd-ca", "str", _check_path,
            "CA certificate(s) (PEM) to verify etcd with (https:// URLs).", optional=True,
            shown_default="the system trust store"),
    _Option("cluster-etcd-cert", "str", _check_path,
            "Client certificate (PEM) for an etcd that requires one.", optional=True),
    _Option("cluster-etcd-key", "str", _check_path,
            "Private key (PEM) of the etcd client certificate.", optional=True),
    _Option("cluster-etcd-user", "str", _check_token,
            "etcd user name, for an etcd with authentication on.", optional=True),
    _Option("cluster-etcd-password-file", "str", _check_path,
            "File holding the etcd user's password.", optional=True),
    _Option("node-name", "str", _check_node_name,
            "This server's name in the cluster; unique per node.", optional=True,
            shown_default="the host name"),
    _Option("cluster-listener", "str", _check_multiplexer_listener,
            "Listener for calls forwarded by other nodes: HOST:PORT or a Twisted "
            "endpoint."),
    _Option("cluster-advertise", "str", _check_dial_address,
            "HOST:PORT other nodes dial to reach this node's cluster listener.",
            optional=True, shown_default="the cluster listener's HOST:PORT"),
    _Option("cluster-token-file", "str", _check_path,
            "File holding the secret every node presents to the others (the same on "
            "all nodes); required in cluster mode.", optional=True),
    _Option("cluster-tls-cert", "str", _check_path,
            "Certificate (PEM chain) of this node for mutual TLS between nodes.",
            optional=True, shown_default="no TLS between nodes"),
    _Option("cluster-tls-key", "str", _check_path,
            "Private key (PEM) of the node certificate.", optional=True),
    _Option("cluster-tls-ca", "str", _check_path,
            "CA certificate(s) (PEM) that signed every node's certificate.", optional=True),
)

SERVER_OPTIONS: Tuple[_Option, ...] = (
    _Option("multiplexer-listener", "str", _check_multiplexer_listener,
            "Listener address used by multiplexer clients: HOST:PORT or a Twisted "
            "endpoint (tcp:..., unix:..., systemd:...)."),
    _Option("proxy-listener", "str", _check_multiplexer_listener,
            "Listener address for gRPC users: HOST:PORT or a Twisted endpoint "
            "(tcp:..., unix:..., systemd:...)."),
    _Option("authority-domain", "str", _check_domain,
            "Route calls without client-id metadata by :authority "
            "<client-id>.<domain>.", optional=True, shown_default="off"),
    _Option("default-client-id", "str", _check_client_id,
            "Client that gets calls carrying no client-id.", optional=True,
            shown_default="none: such calls fail"),
    _Option("max-message-size", "int", _positive_int,
            "Largest gRPC message in bytes the proxy passes.",
            optional=True, shown_default="unbounded"),
    _Option("runtime-dir", "str", _check_path,
            "Directory (0700) of the private socket of the proxy's own services.", optional=True,
            shown_default="a private temporary directory"),
    _Option("handshake-timeout", "float", _number(True),
            "Seconds a new multiplexer client has to finish its handshake."),
    _Option("duplicate-ping-timeout", "float", _number(True),
            "Seconds to wait for the old session's ping answer when a client id "
            "connects twice."),
    *_LIMIT_OPTIONS,
    _SHUTDOWN_OPTION,
    _METRICS_OPTION,
    # Proxy endpoint security (files are read and checked by grpcmux.tls).
    _Option("proxy-tls-cert", "str", _check_path,
            "Serve the proxy endpoint over TLS with this PEM certificate (chain).",
            optional=True, shown_default="off: plaintext"),
    _Option("proxy-tls-key", "str", _check_path,
            "Unencrypted PEM private key of the proxy TLS certificate.", optional=True),
    _Option("proxy-tls-client-ca", "str", _check_path,
            "Require proxy callers to present a client certificate issued by this "
            "PEM CA (mTLS).", optional=True, shown_default="off"),
    _Option("proxy-auth-tokens", "str", _check_path,
            "YAML file mapping SHA-256 digests of end-user tokens to the client ids "
            "(glob patterns) they may call; callers send the metadata grpcmux-token.",
            optional=True, shown_default="off: every caller may call every client"),
) + _SERVER_SECURITY_OPTIONS + _CLUSTER_OPTIONS + _KEEPALIVE_OPTIONS + _LOG_OPTIONS + (
    _CONFIG_OPTION,)

CLIENT_OPTIONS: Tuple[_Option, ...] = (
    _Option("client-id", "str", _check_client_id,
            "ID of the client. If no value specified, will generate one "
            "automatically.", optional=True, shown_default="a random pet name"),
    _Option("multiplexer-address", "addresses", _check_dial_addresses,
            "Multiplexer server address (HOST:PORT), or several separated by commas "
            "(a list in YAML): tried in turn from a random one; a host name stands "
            "for all its addresses."),
    _Option("grpc-server-address", "str", _check_dial_address,
            "gRPC server address that will be proxied (HOST:PORT or unix:PATH)."),
    _Option("label", "labels", _check_labels,
            "Label key=value announced to the server (repeatable; the environment "
            "takes a comma-separated list)."),
    _Option("wire-protocol", "str", _choice(WIRE_PROTOCOLS),
            '"native" (grpcmux handshake) or "legacy" (Go grpc-multiplexer '
            "v0.2.1 servers)."),
    _SHUTDOWN_OPTION,
    _METRICS_OPTION,
) + _CLIENT_SECURITY_OPTIONS + _KEEPALIVE_OPTIONS + _LOG_OPTIONS + (_CONFIG_OPTION,)


def _validate_fields(settings: Any, options: Sequence[_Option]) -> None:
    """Check every field of a settings object, normalising values in place."""
    cls = type(settings).__name__
    for option in options:
        name = _field_name(option)
        value = getattr(settings, name)
        if value is None and option.optional:
            continue
        try:
            if option.kind in ("int", "float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _Invalid("a number")
                if option.kind == "int" and not isinstance(value, int):
                    raise _Invalid("a whole number")
            elif option.kind in ("str", "addresses") and not isinstance(value, str):
                raise _Invalid("a string")
            elif option.kind == "bool" and not isinstance(value, bool):
                raise _Invalid("True or False")
            normalised = option.check(value)
        except _Invalid as error:
            raise ConfigError(f"{cls}.{name}: expected {error}, got {_shown(option, value)}")
        object.__setattr__(settings, name, normalised)


@dataclass(frozen=True)
class _CommonSettings:
    """The options both roles have (listed last in ``--help``)."""

    shutdown_grace: float = 10.0
    metrics_listener: Optional[str] = None  # None: no metrics endpoint
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 10.0
    # 1 MiB rather than yamux's 256 KiB: one stream's bytes in flight, so a stream
    # over a long or fast path is not held back by waiting for window updates.
    stream_window: int = 1024 * 1024
    log_level: str = "info"
    log_format: str = "pretty"
    config: Optional[str] = None  # the config file the values were read from

    def yamux_config(self, **more: Any) -> YamuxConfig:
        """The multiplexer sessions' configuration: keepalive and stream window from
        these settings, ``more`` YamuxConfig fields as given, the rest yamux's."""
        return YamuxConfig(
            keepalive_interval=self.keepalive_interval,
            connection_write_timeout=self.keepalive_timeout,
            max_stream_window_size=self.stream_window,
            **more,
        )


@dataclass(frozen=True)
class ServerSettings(_CommonSettings):
    """Everything the multiplexer server needs; validated on construction.

    The one place the server's options have their defaults: the components (the
    multiplexer endpoint, the proxy, the router's limits, Discovery) are given
    these settings, or a part made from them, and declare no defaults of their own.
    """

    multiplexer_listener: str = "localhost:7602"
    proxy_listener: str = "localhost:7592"
    authority_domain: Optional[str] = None
    default_client_id: Optional[str] = None
    max_message_size: Optional[int] = None
    runtime_dir: Optional[str] = None
    handshake_timeout: float = 10.0
    duplicate_ping_timeout: float = 2.0
    max_clients: int = 10000
    max_handshakes: int = 1000
    max_streams_per_client: int = 1000
    max_proxy_calls: int = 10000
    max_calls_per_client: int = 1000
    # A reading Watch caller must not fall this far behind even when every client
    # of a full server (max_clients) disconnects at once.
    watch_queue_limit: int = 10000
    # Proxy endpoint security: file paths (None: off).
    proxy_tls_cert: Optional[str] = None
    proxy_tls_key: Optional[str] = None
    proxy_tls_client_ca: Optional[str] = None
    proxy_auth_tokens: Optional[str] = None
    # Multiplexer endpoint security (docs/security.rst).
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    client_id_from_cert: bool = False
    auth_tokens: Optional[str] = None
    allow_legacy_clients: bool = False
    # Cluster mode (None: off); files are read by _check_cluster.
    cluster_etcd: Optional[str] = None
    cluster_etcd_ca: Optional[str] = None
    cluster_etcd_cert: Optional[str] = None
    cluster_etcd_key: Optional[str] = None
    cluster_etcd_user: Optional[str] = None
    cluster_etcd_password_file: Optional[str] = None
    node_name: Optional[str] = None  # None: the host name
    cluster_listener: str = "localhost:7612"
    cluster_advertise: Optional[str] = None  # None: the cluster listener's HOST:PORT
    cluster_token_file: Optional[str] = None
    cluster_tls_cert: Optional[str] = None
    cluster_tls_key: Optional[str] = None
    cluster_tls_ca: Optional[str] = None

    def __post_init__(self) -> None:
        _validate_fields(self, SERVER_OPTIONS)
        _check_key_pair(self, "proxy_tls_cert", "proxy_tls_key", "proxy_tls_client_ca")
        _check_server_security(self)
        _check_cluster(self)


def _check_key_pair(settings, cert: str, key: str, client_ca: Optional[str] = None) -> None:
    """A certificate and its key come as a pair, and a client CA only with the pair.

    ``cert``, ``key`` and ``client_ca`` name the settings' fields.
    """
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    has_cert = getattr(settings, cert) is not None
    if has_cert != (getattr(settings, key) is not None):
        raise ConfigError(f"{flag(cert)} and {flag(key)}: expected both or neither")
    if client_ca and getattr(settings, client_ca) is not None and not has_cert:
        raise ConfigError(f"{flag(client_ca)}: expected {flag(cert)} and {flag(key)} as well")


@dataclass(frozen=True)
class ClientSettings(_CommonSettings):
    """Everything the multiplexer client needs; validated on construction."""

    client_id: Optional[str] = None  # None: the client picks a random pet name
    multiplexer_address: str = "localhost:7602"
    grpc_server_address: str = "localhost:7592"
    labels: Tuple[Tuple[str, str], ...] = ()
    wire_protocol: str = "native"
    # security (docs/security.rst); token is the one in effect, read from token_file
    tls: bool = False
    tls_ca: Optional[str] = None
    tls_server_name: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    token_file: Optional[str] = None

    def __post_init__(self) -> None:
        _validate_fields(self, CLIENT_OPTIONS)
        _check_client_security(self)

    @property
    def multiplexer_addresses(self) -> Tuple[str, ...]:
        """The multiplexer addresses, in the order given."""
        return tuple(self.multiplexer_address.split(","))

    @property
    def server_name(self) -> Optional[str]:
        """The name the first server's certificate is checked against."""
        return self.server_name_for(self.multiplexer_addresses[0])

    def server_name_for(self, address: str) -> Optional[str]:
        """The name the certificate of the server at ``address`` is checked against."""
        if self.tls_server_name or address.startswith("unix:"):
            return self.tls_server_name
        return addresses.parse_host_port(address)[0]

    def tls_creator_for(self, address: str) -> Any:
        """The TLS options for dialling ``address`` (None without --tls)."""
        return self.tls_creators.get(self.server_name_for(address))


def _check_server_security(settings: ServerSettings) -> None:
    """Options that only work together, and the files they name: loaded once here
    into ``tls_options`` and ``client_tokens`` (not fields: derived from the paths)."""
    from grpcmux.tls import TLSConfigError, server_options
    from grpcmux.tokens import ClientTokens, TokenFileError

    _check_key_pair(settings, "tls_cert", "tls_key", "tls_client_ca")
    if settings.client_id_from_cert and not settings.tls_client_ca:
        raise ConfigError("--client-id-from-cert: expected --tls-client-ca as well")
    tls_options = tokens = None
    try:
        if settings.tls_cert:
            tls_options = server_options(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except TLSConfigError as error:
        raise ConfigError(str(error))
    try:
        if settings.auth_tokens:
            tokens = ClientTokens.load(settings.auth_tokens)
    except TokenFileError as error:
        raise ConfigError(f"--auth-tokens {error}")
    object.__setattr__(settings, "tls_options", tls_options)
    object.__setattr__(settings, "client_tokens", tokens)


def _check_cluster(settings: ServerSettings) -> None:
    """Cluster options need --cluster-etcd and each other; reads their files into
    ``cluster_token``, ``etcd_password`` and ``etcd_tls`` (PEM bytes: ca, key, chain)
    and fills ``node_name`` and ``cluster_advertise`` when left out."""
    from grpcmux.cluster.etcd import parse_endpoints
    from grpcmux.tls import TLSConfigError, read_certificates, read_key_pair

    given = [o.flag for o in _CLUSTER_OPTIONS[1:] if getattr(settings, o.attr) is not None
             and getattr(settings, o.attr) != default_of(ServerSettings, o)]
    if settings.cluster_etcd is None:
        if given:
            raise ConfigError(f"--{given[0]}: expected --cluster-etcd as well")
        return
    _, https = parse_endpoints(settings.cluster_etcd)
    for flag in ("cluster-etcd-ca", "cluster-etcd-cert"):
        if getattr(settings, flag.replace("-", "_")) and not https:
            raise ConfigError(f"--{flag}: expected https:// etcd URLs in --cluster-etcd")
    _check_key_pair(settings, "cluster_etcd_cert", "cluster_etcd_key")
    if (settings.cluster_etcd_user is None) != (settings.cluster_etcd_password_file is None):
        raise ConfigError("--cluster-etcd-user and --cluster-etcd-password-file: "
                          "expected both or neither")
    if settings.cluster_token_file is None:
        raise ConfigError("--cluster-token-file: expected a file holding the nodes' "
                          "shared secret, as --cluster-etcd is given")
    tls = (settings.cluster_tls_cert, settings.cluster_tls_key, settings.cluster_tls_ca)
    if any(tls) and not all(tls):
        raise ConfigError("--cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca: "
                          "expected all three (mutual TLS between nodes) or none")
    etcd_tls = None
    try:
        if all(tls):
            read_key_pair(settings.cluster_tls_cert, settings.cluster_tls_key,
                          "--cluster-tls-cert", "--cluster-tls-key")
            read_certificates(settings.cluster_tls_ca, "--cluster-tls-ca")
        if https:
            ca = (read_certificates(settings.cluster_etcd_ca, "--cluster-etcd-ca")[0]
                  if settings.cluster_etcd_ca else None)
            pair = (read_key_pair(settings.cluster_etcd_cert, settings.cluster_etcd_key,
                                  "--cluster-etcd-cert", "--cluster-etcd-key")
                    if settings.cluster_etcd_cert else None)
            etcd_tls = (ca, pair.key_pem if pair else None, pair.chain_pem if pair else None)
    except TLSConfigError as error:
        raise ConfigError(str(error))
    password = None
    if settings.cluster_etcd_password_file:
        password = _read_secret_file(settings.cluster_etcd_password_file,
                                     "--cluster-etcd-password-file", "a password")
    token = _read_secret_file(settings.cluster_token_file, "--cluster-token-file",
                              "a token of printable characters without whitespace")
    if settings.node_name is None:
        import socket

        object.__setattr__(settings, "node_name", _node_name_from_host(socket.gethostname()))
    if settings.cluster_advertise is None:
        object.__setattr__(settings, "cluster_advertise",
                           _advertised(settings.cluster_listener))
    object.__setattr__(settings, "cluster_token", token)
    object.__setattr__(settings, "etcd_password", password)
    object.__setattr__(settings, "etcd_tls", etcd_tls)


def _node_name_from_host(host: str) -> str:
    try:
        return _check_node_name(host)
    except _Invalid as error:
        raise ConfigError(f"--node-name: the host name {host!r} is not usable; expected "
                          f"{error}")


def _advertised(listener: str) -> str:
    """The cluster listener's HOST:PORT, if other nodes can dial it."""
    host = port = None
    if addresses.is_host_port(listener):
        host, port = addresses.parse_host_port(listener, listener=True)
    if not host or host in ("0.0.0.0", "::") or not port:
        raise ConfigError(
            f"--cluster-advertise: expected the HOST:PORT other nodes dial, as "
            f"--cluster-listener {listener} names no such address")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_secret_file(path: str, flag: str, expected: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            secret = stream.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{flag} {path}: cannot be read: {reason}")
    if not secret or not secret.isprintable() or any(c.isspace() for c in secret):
        raise ConfigError(f"{flag} {path}: expected {expected}")
    return secret


def _check_client_security(settings: ClientSettings) -> None:
    """TLS options need --tls; reads --token-file into ``token`` and the TLS files
    into ``tls_creators`` (server name -> options; ``tls_creator`` for the first
    address; not fields: derived from the paths; empty / None without --tls)."""
    from grpcmux.tls import TLSConfigError, client_creator

    for flag in ("tls-ca", "tls-server-name", "tls-cert", "tls-key"):
        if getattr(settings, flag.replace("-", "_")) and not settings.tls:
            raise ConfigError(f"--{flag}: expected --tls as well")
    _check_key_pair(settings, "tls_cert", "tls_key")
    if settings.tls and any(settings.server_name_for(address) is None
                            for address in settings.multiplexer_addresses):
        raise ConfigError(
            "--tls-server-name: expected a name to verify the server with, as "
            "--multiplexer-address is a unix: path"
        )
    if settings.token and settings.token_file:
        raise ConfigError("--token and --token-file: expected one of them, not both")
    if settings.token_file:
        object.__setattr__(settings, "token", _read_token_file(settings.token_file))
    creators = {}
    if settings.tls:
        try:
            for address in settings.multiplexer_addresses:
                name = settings.server_name_for(address)
                if name not in creators:
                    creators[name] = client_creator(name, settings.tls_ca,
                                                    settings.tls_cert, settings.tls_key)
        except TLSConfigError as error:
            raise ConfigError(str(error))
    object.__setattr__(settings, "tls_creators", creators)
    object.__setattr__(settings, "tls_creator", creators.get(settings.server_name))


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            token = stream.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"--token-file {path}: cannot be read: {reason}")
    try:
        return _check_token(token)
    except _Invalid as error:
        raise ConfigError(f"--token-file {path}: expected {error}")


def _field_name(option: _Option) -> str:
    """The settings attribute an option fills (the --label flag fills labels)."""
    return "labels" if option.flag == "label" else option.attr


# -- YAML files ------------------------------------------------------------------


def _yaml_loader() -> type:
    """A safe YAML loader that rejects a key given twice in one mapping."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_config_file(path: str, options: Sequence[_Option]) -> dict:
    """Read a YAML config file into ``{attr: checked value}``; ConfigError if bad."""
    import yaml

    where = f"config file {path}"
    try:
        with open(path, "rb") as stream:
            data = yaml.load(stream, Loader=_yaml_loader())
    except OSError as error:
        raise ConfigError(f"{where}: cannot be read: {error.strerror or error}")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: expected valid YAML, syntax error{at}: {problem}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping of option names to values at the top "
            f"level, got {_yaml_type_name(data)}"
        )
    by_flag = {o.flag: o for o in options if o.flag != "config"}
    values = {}
    for key, value in data.items():
        option = by_flag.get(key)
        if option is None:
            raise ConfigError(
                f"{where}: unknown key {key!r}; expected one of: "
                + ", ".join(sorted(by_flag))
            )
        if value is None:
            continue
        try:
            values[option.attr] = _from_yaml(option, value)
        except _Invalid as error:
            raise ConfigError(
                f"{where}: key {key!r}: expected {error}"
                + ("" if ", got " in str(error) else f", got {_shown(option, value)}")
            )
    return values


def config_search_path(
    stem: str, home: Optional[str], etc_dir: str = DEFAULT_ETC_DIR
) -> Tuple[str, ...]:
    """Files tried, in order, when no config file is named."""
    paths = []
    if home:
        paths.append(os.path.join(home, f".{stem}.yaml"))
        paths.append(os.path.join(home, f".{stem}"))
    paths.append(os.path.join(etc_dir, f"{stem}.yaml"))
    return tuple(paths)


# -- loading -----------------------------------------------------------------------


def _load(
    cls: type,
    options: Sequence[_Option],
    stem: str,
    flags: Mapping[str, Any],
    environ: Optional[Mapping[str, str]],
    home: Optional[str],
    etc_dir: str,
) -> Any:
    environ = os.environ if environ is None else environ
    if home is None:
        home = environ.get("HOME") or None
    by_attr = {o.attr: o for o in options}
    unknown = set(flags) - set(by_attr)
    if unknown:
        raise TypeError(f"unknown option names: {sorted(unknown)}")

    flag_values, env_values = {}, {}
    for attr, text in flags.items():
        if text is None:
            continue
        option = by_attr[attr]
        try:
            flag_values[attr] = _from_text(option, text)
        except _Invalid as error:
            shown = text if isinstance(text, (str, bool)) else " ".join(text)
            raise ConfigError(
                f"--{option.flag}: expected {error}, got {_shown(option, shown)}"
            )
    for option in options:
        text = environ.get(option.env)
        if not text:  # unset or empty: not given
            continue
        try:
            env_values[option.attr] = _from_text(option, text)
        except _Invalid as error:
            raise ConfigError(
                f"environment variable {option.env}: expected {error}, "
                f"got {_shown(option, text)}"
            )

    config_path = flag_values.get("config", env_values.get("config"))
    if config_path is None:
        config_path = next(
            (p for p in config_search_path(stem, home, etc_dir) if os.path.isfile(p)),
            None,
        )
    file_values = read_config_file(config_path, options) if config_path else {}

    merged: dict = {}
    for layer in (file_values, env_values, flag_values):
        merged.update(layer)
    merged["config"] = config_path
    fields = {_field_name(by_attr[attr]): value for attr, value in merged.items()}
    return cls(**fields)


def load_server_settings(
    flags: Mapping[str, Any] = {},
    *,
    environ: Optional[Mapping[str, str]] = None,
    home: Optional[str] = None,
    etc_dir: str = DEFAULT_ETC_DIR,
) -> ServerSettings:
    """Build ServerSettings: flags > GRPCMUX_* environment > YAML file > default.

    *flags* holds only the options given on the command line, by attribute name
    (``{"proxy_listener": "0.0.0.0:7592"}``) with their text values.  *environ*
    (default ``os.environ``), *home* (default ``$HOME``) and *etc_dir* decide the
    environment and the config file search.  ``settings.config`` is the file used.
    """
    return _load(ServerSettings, SERVER_OPTIONS, SERVER_FILE_STEM, flags, environ,
                 home, etc_dir)


def load_client_settings(
    flags: Mapping[str, Any] = {},
    *,
    environ: Optional[Mapping[str, str]] = None,
    home: Optional[str] = None,
    etc_dir: str = DEFAULT_ETC_DIR,
) -> ClientSettings:
    """Build ClientSettings like :func:`load_server_settings`; ``label`` is a list."""
    return _load(ClientSettings, CLIENT_OPTIONS, CLIENT_FILE_STEM, flags, environ,
                 home, etc_dir)


# GRPCMUX_* variables read beyond the options' own: the ``grpcmux`` command's, and
# the test suite's Go build cache (tests/interop/gobuild.py), so neither is warned of.
OTHER_ENVIRONMENT = ("GRPCMUX_PROXY_ADDRESS", "GRPCMUX_TOKEN", "GRPCMUX_GO_CACHE")


def nearest(name: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate a misspelled *name* most likely meant (or one it abbreviates)."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.7)
    return (close or sorted(c for c in candidates if c.startswith(name))[:1] or [None])[0]


def environment_warnings(environ: Optional[Mapping[str, str]] = None) -> list:
    """One line per GRPCMUX_* variable that no grpcmux program reads.

    A misspelled variable would otherwise be ignored without a word; the line
    names the nearest known variable.  Server and client variables are known to
    both (one environment file often serves both units).
    """
    environ = os.environ if environ is None else environ
    known = {o.env for o in SERVER_OPTIONS + CLIENT_OPTIONS}.union(OTHER_ENVIRONMENT)
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        # Compared without the prefix, which every candidate shares.
        close = nearest(name[len(ENV_PREFIX):], [k[len(ENV_PREFIX):] for k in known])
        hint = f"; did you mean {ENV_PREFIX}{close}?" if close else ""
        warnings.append(f"environment variable {name} is not a grpcmux setting and is "
                        f"ignored{hint}")
    return warnings


def default_of(settings_class: type, option: _Option) -> Any:
    """The default value of the settings field an option fills."""
    for field in dataclasses.fields(settings_class):
        if field.name == _field_name(option):
            return field.default
    raise KeyError(option.flag)


__all__ = [
    "CLIENT_OPTIONS",
    "ClientSettings",
    "ConfigError",
    "SERVER_OPTIONS",
    "ServerSettings",
    "config_search_path",
    "default_of",
    "environment_warnings",
    "nearest",
    "load_client_settings",
    "load_server_settings",
    "read_config_file",
]
