"""``HOST:PORT`` addresses, as the Go original takes them, and Twisted endpoints."""

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, serverFromString

#: Endpoint types a listener may name directly instead of ``HOST:PORT``.
ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "systemd:", "ssl:")


class AddressError(ValueError):
    """An address that is neither ``HOST:PORT`` nor an accepted endpoint string."""


def split_host_port(address):
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into ``(host, port)``.

    An empty host (``:7602``) means every interface, as in Go.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise AddressError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"{address!r}: write an IPv6 host in brackets, as [::1]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"{address!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"{address!r}: port {port} is not between 0 and 65535")
    return host, port


def is_endpoint_string(address):
    return address.startswith(ENDPOINT_PREFIXES)


def server_endpoint_description(address):
    """A Twisted server endpoint description for ``HOST:PORT`` or an endpoint string."""
    if is_endpoint_string(address):
        return address
    host, port = split_host_port(address)
    if not host:
        return f"tcp:{port}"
    escaped = host.replace(":", r"\:")
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={escaped}"


def server_endpoint(reactor, address):
    return serverFromString(reactor, server_endpoint_description(address))


def client_endpoint(reactor, address, timeout=10):
    """A ``HostnameEndpoint`` for ``HOST:PORT`` (names resolve to v4 and v6).

    ``unix:PATH`` names a UNIX socket, for gRPC servers that listen on one.
    """
    if address.startswith("unix:"):
        return UNIXClientEndpoint(reactor, address[len("unix:"):], timeout=timeout)
    host, port = split_host_port(address)
    return HostnameEndpoint(reactor, host or "localhost", port, timeout=timeout)
