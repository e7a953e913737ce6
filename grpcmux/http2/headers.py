"""Header lists: the checks RFC 9113 section 8 asks of a server and an intermediary.

Header lists are lists of ``(name, value)`` byte pairs as hpack decodes them with
``raw=True``; a ``NeverIndexedHeaderTuple`` stays one when it is forwarded, so a
field the sender marked never-indexed is re-encoded never-indexed (section 7.1.3 of
RFC 7541). Checks raise :class:`HeaderError`, which the connection turns into a
stream error (PROTOCOL_ERROR): a malformed request is never forwarded.
"""

import re

REQUEST_PSEUDO_HEADERS = frozenset([b":method", b":scheme", b":authority", b":path"])
# Connection-specific fields (section 8.2.2); ``te`` is allowed with "trailers" only.
CONNECTION_HEADERS = frozenset([
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
])
# A field name: lowercase token characters only (section 8.2.1, RFC 9110 5.1).
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


class HeaderError(ValueError):
    """A malformed header list; ``str()`` says what is wrong."""


def _check_field(name, value):
    if not name or _BAD_NAME.search(name):
        raise HeaderError(f"invalid header name {name[:64]!r}")
    if _BAD_VALUE.search(value):
        raise HeaderError(f"invalid value of header {name[:64].decode('latin-1')!r}")
    if name in CONNECTION_HEADERS:
        raise HeaderError(f"connection-specific header {name.decode('latin-1')!r}")
    if name == b"te" and value != b"trailers":
        raise HeaderError("header 'te' other than 'trailers'")


class Request:
    """A validated request header list, with its pseudo-headers picked out."""

    __slots__ = ("method", "scheme", "authority", "path", "fields")

    def __init__(self, method, scheme, authority, path, fields):
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.fields = fields  # regular fields, in order, as decoded

    def values(self, name):
        """Every value of the regular field ``name`` (bytes), in order."""
        return [v for n, v in self.fields if n == name]


def parse_request(headers):
    """A :class:`Request` from a decoded request header block; HeaderError if malformed."""
    pseudo = {}
    fields = []
    for field in headers:
        name, value = field
        if name[:1] == b":":
            if fields:
                raise HeaderError("pseudo-header after a regular header")
            if name not in REQUEST_PSEUDO_HEADERS:
                raise HeaderError(f"unknown pseudo-header {name.decode('latin-1')!r}")
            if name in pseudo:
                raise HeaderError(f"duplicate pseudo-header {name.decode('latin-1')!r}")
            if _BAD_VALUE.search(value):
                raise HeaderError(f"invalid value of {name.decode('latin-1')}")
            pseudo[name] = value
        else:
            _check_field(name, value)
            fields.append(field)
    method = pseudo.get(b":method")
    if method is None:
        raise HeaderError("missing :method")
    if method == b"CONNECT":
        raise HeaderError("CONNECT is not proxied")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if not scheme or not path:
        raise HeaderError("missing :scheme or :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise HeaderError(":path is not absolute")  # section 8.3.1
    authority = pseudo.get(b":authority")
    host = [v for n, v in fields if n == b"host"]
    if authority is None and host:
        authority = host[0]
    return Request(method, scheme, authority, path, fields)


def check_response(headers, trailers=False):
    """Validate a response (or trailer) block; returns the :status value (None for trailers)."""
    status = None
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if trailers or regular or name != b":status" or status is not None:
                raise HeaderError(f"unexpected pseudo-header {name.decode('latin-1')!r}")
            if len(value) != 3 or not value.isdigit():
                raise HeaderError("invalid :status")
            status = value
        else:
            regular = True
            _check_field(name, value)
    if not trailers and status is None:
        raise HeaderError("missing :status")
    return status


def check_trailers(headers):
    """Validate request trailers: regular fields only."""
    check_response(headers, trailers=True)
