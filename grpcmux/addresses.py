"""Addresses as operators write them, and the Twisted endpoints they become.

``HOST:PORT`` (``[v6]:PORT`` for IPv6) is what the Go original takes everywhere.
A listener may also be any Twisted server endpoint string (``tcp:``, ``unix:``,
``systemd:``...), and an address to dial may be ``unix:PATH``.
"""

import functools
import ipaddress
import re

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, serverFromString

HOST_PORT_EXPECTED = "HOST:PORT (IPv6 hosts in brackets, e.g. [::1]:7602)"

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class AddressError(ValueError):
    """An address that cannot be used; ``str()`` says what was expected."""


def is_hostname(host):
    """True for an RFC 1123 host name or an IPv4 address."""
    if not host or len(host) > 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_HOSTNAME_LABEL.match(label) for label in labels)


def parse_host_port(value, *, listener=False):
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into ``(host, port)``.

    A listener address may leave the host empty (all interfaces) and use port 0
    (any free port); an address to dial may not.
    """
    expected = HOST_PORT_EXPECTED
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1:close + 2] != ":":
            raise AddressError(expected)
        host, port_text = value[1:close], value[close + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(expected + "; the bracketed part must be an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise AddressError(expected)
        if (host or not listener) and not is_hostname(host):
            raise AddressError(expected + "; HOST must be a host name or an IP address")
    if not port_text.isdigit() or not port_text.isascii():
        raise AddressError(expected + "; PORT must be a number")
    port = int(port_text)
    lowest = 0 if listener else 1
    if not lowest <= port <= 65535:
        raise AddressError(f"{expected}; PORT must be in {lowest}..65535")
    return host, port


@functools.lru_cache(maxsize=1)
def endpoint_types():
    """Server endpoint type names Twisted knows: built-ins and plugin prefixes.

    Scanning the plugins once is enough: every address check asks this.
    """
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    names = {"tcp", "unix", "ssl"}
    names.update(p.prefix.lower() for p in getPlugins(IStreamServerEndpointStringParser))
    return names


def is_host_port(value):
    """True for a listener's HOST:PORT; ``tcp:7602`` and the like are endpoint strings."""
    if value.partition(":")[0].lower() in endpoint_types():
        return False
    try:
        parse_host_port(value, listener=True)
    except AddressError:
        return False
    return True


def check_dial_address(value):
    """``HOST:PORT`` or ``unix:PATH``; returns it unchanged or raises ``AddressError``."""
    if value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise AddressError(f"{HOST_PORT_EXPECTED} or unix:PATH; the path is empty")
        return value
    parse_host_port(value)
    return value


def check_listen_address(value):
    """A listener's ``HOST:PORT`` (no endpoint string)."""
    parse_host_port(value, listener=True)
    if value.partition(":")[0].lower() in endpoint_types():
        raise AddressError(f"{HOST_PORT_EXPECTED}, not a Twisted endpoint string")
    return value


class _NoReactor:
    """Stands in for the reactor while an endpoint description is only parsed."""


def check_server_endpoint(value):
    """HOST:PORT, or a Twisted server endpoint description (tcp:, unix:, systemd:...).

    An endpoint string is checked with ``serverFromString`` against a placeholder
    reactor: that parses it (and resolves endpoint plugins) without listening.
    """
    if is_host_port(value):
        return value
    if ":" not in value:
        parse_host_port(value, listener=True)  # raises the HOST:PORT expectation
    try:
        serverFromString(_NoReactor(), value)
    except (IndexError, KeyError) as error:
        detail = f"no such inherited socket: {error}"
    except Exception as error:  # the parsers raise many kinds; all mean 'invalid'
        detail = str(error) or type(error).__name__
    else:
        return value
    raise AddressError(
        "HOST:PORT or a Twisted server endpoint such as tcp:7602, "
        f"unix:/run/grpcmux.sock or systemd:domain=INET:index=0 ({detail})"
    )


def server_endpoint_description(value):
    """A Twisted server endpoint string for a listener setting.

    ``HOST:PORT`` becomes ``tcp:`` (``tcp6:`` for bracketed IPv6) with the host as
    interface; an endpoint description is returned unchanged.
    """
    if not is_host_port(value):
        return value
    host, port = parse_host_port(value, listener=True)
    if value.startswith("["):
        return "tcp6:{}:interface={}".format(port, host.replace(":", "\\:"))
    if not host:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={host}"


def server_endpoint(reactor, address):
    return serverFromString(reactor, server_endpoint_description(address))


def client_endpoint(reactor, address, timeout=10):
    """An endpoint to dial: ``HostnameEndpoint`` (v4 and v6) or, for ``unix:PATH``, UNIX."""
    if address.startswith("unix:"):
        return UNIXClientEndpoint(reactor, address[len("unix:"):], timeout=timeout)
    host, port = parse_host_port(address)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def describe_address(address):
    """``HOST:PORT`` (``[v6]:PORT``) of a listening or peer address; else its str()."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
