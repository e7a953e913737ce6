"""gRPC statuses the router answers itself, as HTTP/2 header lists.

The router never decodes messages; it only speaks gRPC to say why it did not
forward a call: a trailers-only response (``:status 200``, ``grpc-status``,
``grpc-message``) when nothing of a response was sent, or trailers after one.
"""

from urllib.parse import quote

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class CallRefused(Exception):
    """A call the router answers itself with ``code`` and ``message``."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def code_name(value):
    """The status name of a ``grpc-status`` value (bytes or int), UNKNOWN if odd."""
    try:
        return CODE_NAMES.get(int(value), "UNKNOWN")
    except (TypeError, ValueError):
        return "UNKNOWN"


def trailers(code, message):
    """The trailer fields of a status (grpc-message percent-encoded as gRPC asks)."""
    encoded = quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")
    return [(b"grpc-status", str(code).encode("ascii")), (b"grpc-message", encoded)]


def trailers_only(code, message):
    """A whole response that is only a status: one HEADERS frame with END_STREAM."""
    return _RESPONSE_HEADERS + trailers(code, message)
