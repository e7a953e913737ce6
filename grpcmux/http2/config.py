"""The HTTP/2 router's bounds, one frozen object for every connection it runs."""

from dataclasses import dataclass


@dataclass(frozen=True)
class H2Config:
    """Limits and windows of one side of the router (callers or upstreams).

    Every bound here is stated in docs/limits.rst, with what a peer that
    passes it gets.
    """

    #: Stream window we grant (SETTINGS_INITIAL_WINDOW_SIZE): what one stream may
    #: have in flight towards us, hence what we buffer for it at most.
    initial_window: int = 1024 * 1024
    #: Streams a peer may have open on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 1000
    #: Largest decoded header list (RFC 9113 size: names + values + 32 per field);
    #: a request over it is refused with RESOURCE_EXHAUSTED, the connection stays.
    max_header_list_size: int = 64 * 1024
    #: Largest header block as sent (HEADERS + CONTINUATION), and the most a block
    #: may expand to when decoded: past either the connection is closed. Blocks
    #: up to it are decoded whole (the HPACK table must stay in step) and refused.
    max_header_block: int = 4 * 1024 * 1024
    #: CONTINUATION frames one header block may take (a 4 MiB block in 16 KiB frames).
    max_continuations: int = 256
    #: Our HPACK dynamic table (SETTINGS_HEADER_TABLE_SIZE), and the most of the
    #: peer's table size we use when encoding for it.
    header_table_size: int = 4096
    #: Seconds a new connection has to send its preface and SETTINGS.
    preface_timeout: float = 10.0
    #: Seconds a connection may stay without streams before it is closed (0: never).
    idle_timeout: float = 300.0
    #: Control frames (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty DATA) a peer
    #: may send per second on average, and in one burst, beyond the few that each
    #: HEADERS or DATA frame either way earns it (window updates come with traffic).
    control_rate: float = 1000.0
    control_burst: int = 10000
    #: Streams a peer may reset (or make us reset with a stream error) per second on
    #: average, and in one burst: more is a rapid-reset attack (CVE-2023-44487,
    #: CVE-2025-8671) and closes the connection.
    reset_rate: float = 200.0
    reset_burst: int = 1000
    #: Seconds a PING ACK may wait for our next frame to that peer before it is
    #: sent on its own (0: at once). Below any keepalive timeout by far.
    ping_ack_delay: float = 0.005
    #: SETTINGS frames a peer may send per second on average, and in one burst.
    #: Traffic earns none (a peer sends a handful per connection), and each may
    #: touch every open stream.
    settings_rate: float = 10.0
    settings_burst: int = 100
