"""Session configuration with hashicorp/yamux's DefaultConfig values."""

from dataclasses import dataclass

from .errors import YamuxConfigError
from .frame import INITIAL_STREAM_WINDOW, MAX_STREAM_WINDOW


@dataclass(frozen=True)
class YamuxConfig:
    """Tunables of a YamuxSession; defaults match hashicorp/yamux.

    accept_backlog: peer-opened streams not yet acknowledged; more are reset.
    enable_keepalive / keepalive_interval: ping the peer this often (seconds).
    connection_write_timeout: a ping unanswered this long closes the session.
    max_stream_window_size: receive window of each stream (>= 256 KiB); the part
        above 256 KiB is advertised with the SYN/ACK.
    stream_open_timeout: an opened stream not ACKed this long closes the session.
    stream_close_timeout: after loseConnection, wait this long for the peer's FIN,
        then reset the stream.
    max_stream_send_buffer: high-water mark of a stream's send buffer: above it
        the stream pauses its registered producer.
    max_frame_size: largest DATA body sent in one turn of the round-robin
        scheduler (fairness between streams); one default window, so a bulk
        stream costs its reader one frame per read rather than eight.
    max_control_buffer: bytes of control frames queued while the connection's
        write side is paused; beyond it the session stops reading until the
        queue drains (a peer that floods pings but never reads cannot grow it).
    max_streams: streams open at once, both directions together (grpcmux's own
        bound; hashicorp has none): a SYN beyond it is reset, and ``open_stream``
        raises StreamLimitReached.
    """

    accept_backlog: int = 256
    enable_keepalive: bool = True
    keepalive_interval: float = 30.0
    connection_write_timeout: float = 10.0
    max_stream_window_size: int = INITIAL_STREAM_WINDOW
    stream_open_timeout: float = 75.0
    stream_close_timeout: float = 300.0
    max_stream_send_buffer: int = INITIAL_STREAM_WINDOW
    max_frame_size: int = INITIAL_STREAM_WINDOW
    max_control_buffer: int = 64 * 1024
    max_streams: int = 1000

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise YamuxConfigError(f"{name} must be a positive number, not {value!r}")

        for name in ("keepalive_interval", "connection_write_timeout",
                     "stream_open_timeout", "stream_close_timeout"):
            positive(name)
        for name in ("accept_backlog", "max_stream_send_buffer", "max_frame_size",
                     "max_control_buffer", "max_stream_window_size", "max_streams"):
            positive(name)
            if not isinstance(getattr(self, name), int):
                raise YamuxConfigError(f"{name} must be an integer")
        if not isinstance(self.enable_keepalive, bool):
            raise YamuxConfigError("enable_keepalive must be a bool")
        if not INITIAL_STREAM_WINDOW <= self.max_stream_window_size <= MAX_STREAM_WINDOW:
            raise YamuxConfigError(
                f"max_stream_window_size must be between {INITIAL_STREAM_WINDOW} "
                f"and {MAX_STREAM_WINDOW}"
            )
