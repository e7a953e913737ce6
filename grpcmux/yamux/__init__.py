"""yamux (hashicorp/yamux spec) on Twisted: sessions whose streams are transports."""

from .address import StreamAddress
from .config import YamuxConfig
from .errors import (
    GoAwayReceived,
    PingTimeout,
    ProtocolError,
    RemoteGoAwayError,
    SessionClosed,
    StreamIdsExhausted,
    StreamOpenTimeout,
    StreamReset,
    YamuxConfigError,
    YamuxError,
)

__all__ = [
    "StreamAddress",
    "YamuxConfig",
    "GoAwayReceived",
    "PingTimeout",
    "ProtocolError",
    "RemoteGoAwayError",
    "SessionClosed",
    "StreamIdsExhausted",
    "StreamOpenTimeout",
    "StreamReset",
    "YamuxConfigError",
    "YamuxError",
]
