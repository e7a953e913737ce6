"""Exceptions of the yamux layer."""

from twisted.internet.error import ConnectionLost


class YamuxError(Exception):
    """Base class of every yamux error."""


class ProtocolError(YamuxError):
    """The peer broke the yamux protocol (the session sends GoAway(1) and closes)."""


class SessionClosed(YamuxError, ConnectionLost):
    """The session is closed; also the reason its streams see in connectionLost."""


class StreamIdsExhausted(YamuxError):
    """No stream ids are left in this session."""


class GoAwayReceived(YamuxError):
    """The peer sent a GoAway: it accepts no new streams."""


class StreamReset(YamuxError, ConnectionLost):
    """The stream was reset (RST) by the peer or after a timeout."""


class PingTimeout(YamuxError):
    """A ping was not answered within connection_write_timeout."""


class StreamOpenTimeout(YamuxError):
    """An opened stream was not acknowledged within stream_open_timeout."""


class RemoteGoAwayError(YamuxError):
    """The peer closed the session with a GoAway carrying an error code."""


class YamuxConfigError(YamuxError, ValueError):
    """A YamuxConfig value is out of range."""


class GoAwaySent(YamuxError):
    """This side sent a GoAway: it opens no new streams either."""


class StreamLimitReached(YamuxError):
    """The session already has ``max_streams`` streams open: no new one now."""
