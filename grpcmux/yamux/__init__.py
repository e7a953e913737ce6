"""yamux (hashicorp/yamux spec) on Twisted: sessions whose streams are transports."""

from .address import StreamAddress
from .config import YamuxConfig
from .errors import (
    GoAwayReceived,
    GoAwaySent,
    PingTimeout,
    ProtocolError,
    RemoteGoAwayError,
    SessionClosed,
    StreamIdsExhausted,
    StreamLimitReached,
    StreamOpenTimeout,
    StreamReset,
    YamuxConfigError,
    YamuxError,
)
from .endpoints import YamuxStreamClientEndpoint
from .session import YamuxFactory, YamuxSession
from .stream import StreamState, YamuxStream

__all__ = [
    "YamuxSession",
    "YamuxFactory",
    "YamuxStream",
    "StreamState",
    "YamuxStreamClientEndpoint",
    "GoAwaySent",
    "StreamAddress",
    "YamuxConfig",
    "GoAwayReceived",
    "PingTimeout",
    "ProtocolError",
    "RemoteGoAwayError",
    "SessionClosed",
    "StreamIdsExhausted",
    "StreamLimitReached",
    "StreamOpenTimeout",
    "StreamReset",
    "YamuxConfigError",
    "YamuxError",
]
