"""One HTTP/2 connection: frames, header blocks, settings, windows, ping and GOAWAY.

:class:`H2Connection` is the codec half of the router (Envoy's split): it knows one
connection's state and nothing of routing. Each open stream is a :class:`Stream`
whose ``handler`` (the router's call) is told what arrives::

    handler.stream_headers(stream, headers, end_stream)
    handler.stream_data(stream, data, end_stream)   # credit it back with credit()
    handler.stream_reset(stream, error_code)        # RST_STREAM, or the connection ended
    handler.stream_drained(stream, count)           # that many of our bytes went out

Flow control is per stream, never per connection: the connection window is
credited as bytes arrive, a stream's window only as its handler credits what it
forwarded, so a slow stream holds back its own sender and no other. Outbound DATA
waits per stream for the peer's windows; our trailers wait behind our DATA and are
HPACK-encoded only when written, so the peer's decoder sees blocks in table order.
"""

import struct
import time
from collections import deque

from hpack import HPACKError, OversizedHeaderListError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from grpcmux.writes import BATCH, batched

from .hpack_cache import CachingDecoder, CachingEncoder
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    ERROR_COMPRESSION_ERROR,
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_FLOW_CONTROL_ERROR,
    ERROR_FRAME_SIZE_ERROR,
    ERROR_NO_ERROR,
    ERROR_PROTOCOL_ERROR,
    ERROR_REFUSED_STREAM,
    ERROR_SETTINGS_TIMEOUT,
    ERROR_STREAM_CLOSED,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    FRAME_HEADER_LENGTH,
    MAX_FRAME_SIZE_LIMIT,
    MAX_WINDOW,
    PREFACE,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_GRPCMUX_PROXY,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    TYPE_CONTINUATION,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_PRIORITY,
    TYPE_PUSH_PROMISE,
    TYPE_RST_STREAM,
    TYPE_SETTINGS,
    TYPE_WINDOW_UPDATE,
    frame_header,
    parse_frame_header,
)

_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")
# Control frames a peer earns with each HEADERS or DATA it sends and each DATA we
# send it: window updates, and grpc's BDP pings, come with traffic; a flood does not.
_EARNED_CONTROLS = 4
# Stream ids run out at 2^31 - 1; an upstream connection stops taking new streams
# this many ids before, so a fresh connection is ready in time.
_LAST_USABLE_STREAM_ID = 2**31 - 1 - 2 * 1000
# PING acknowledgements held for the next write at most; more go out at once.
_MAX_HELD_ACKS = 16


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY ``code`` and close."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _StreamError(Exception):
    """A stream error (section 5.4.2): RST_STREAM ``code`` on that stream only."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Stream:
    """One stream of a connection, as the router sees it.

    Its windows and queues are kept by its ``H2Connection``; handlers read
    ``closed`` and the flags, and talk to the connection.
    """

    __slots__ = (
        "id", "connection", "handler", "send_window", "recv_window", "uncredited",
        "queued", "queued_bytes", "end_queued", "trailers_queued",
        "local_closed", "remote_closed", "reset", "blocked",
    )

    def __init__(self, connection, stream_id, handler):
        self.id = stream_id
        self.connection = connection
        self.handler = handler
        self.send_window = connection.peer_initial_window
        self.recv_window = connection.config.initial_window
        self.uncredited = 0  # bytes delivered but not yet credited to the peer
        self.queued = deque()  # our DATA waiting for the peer's windows
        self.queued_bytes = 0
        self.end_queued = False  # END_STREAM goes out once the queue is sent
        self.trailers_queued = None  # the trailers that carry it, if any
        self.local_closed = False  # we sent END_STREAM (or RST)
        self.remote_closed = False  # the peer sent END_STREAM (or RST)
        self.reset = False
        self.blocked = False  # waiting in the connection's list for its window

    @property
    def closed(self):
        return self.reset or (self.local_closed and self.remote_closed)

    def __repr__(self):
        return f"<Stream {self.id} on {self.connection!r}>"


class Budget:
    """What the router holds in all, unsent, across every connection it runs.

    Past ``limit`` bytes, stream credits are held back (not refused) until the
    total falls below it again: senders wait, nothing is dropped, and no stream
    can keep more than its window anyway.
    """

    __slots__ = ("limit", "held", "_deferred")

    def __init__(self, limit):
        self.limit = limit
        self.held = 0
        self._deferred = deque()  # (connection, stream, count) credits held back

    @property
    def over(self):
        return self.held > self.limit

    def add(self, count):
        self.held += count

    def remove(self, count):
        self.held -= count
        while self._deferred and not self.over:
            connection, stream, credit = self._deferred.popleft()
            connection.credit(stream, credit)

    def defer(self, connection, stream, count):
        self._deferred.append((connection, stream, count))


class _TokenBucket:
    """A rate with a burst: ``take()`` is False once the burst is spent; ``give()``
    adds tokens up to the burst (traffic that earns its control frames)."""

    __slots__ = ("_rate", "_burst", "_tokens", "_stamp", "_now")

    def __init__(self, rate, burst, now):
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._now = now
        self._stamp = now()

    def take(self):
        now = self._now()
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True

    def give(self, count):
        self._tokens = min(self._burst, self._tokens + count)


@implementer(IPushProducer)
class H2Connection(Protocol):
    """The framing and state of one HTTP/2 connection, either role.

    ``is_client``: we send the preface and open odd streams (an upstream); else we
    expect the client preface and the peer opens streams (a caller), each handed to
    ``on_new_stream(connection, stream_id, headers, end_stream)``, which returns the
    handler for the stream or None after it refused it.
    """

    _log = Logger()

    def __init__(self, config, clock, is_client, on_new_stream=None, budget=None,
                 announce_proxy=False, now=time.monotonic):
        self.config = config
        self.clock = clock
        self.is_client = is_client
        self.on_new_stream = on_new_stream
        self.budget = budget
        self._announce_proxy = announce_proxy
        self.streams = {}
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.peer_max_streams = None  # unlimited until the peer's SETTINGS say
        self.peer_max_header_list = None
        self.send_window = DEFAULT_WINDOW
        self._recv_unacked = 0
        self._decoder = CachingDecoder(config.max_header_block, config.header_table_size)
        self._encoder = CachingEncoder()
        self._next_stream_id = 1 if is_client else 2
        self.last_peer_stream_id = 0
        self._buffer = b""
        self._preface_pending = not is_client
        self.settings_received = False
        self._header_block = None  # (stream id, flags, fragments, size, count)
        self._blocked = deque()  # streams with DATA waiting for the connection window
        self._paused = False  # our transport's buffer is full: DATA waits in its streams
        self.go_away_sent = False
        self.go_away_received = None  # last stream id the peer will process
        self.closed = False
        self._close_waiters = []
        self._preface_timer = None
        self._idle_timer = None
        self._held_acks = []  # PING ACK frames waiting to go out with the next write
        self._ack_timer = None
        self._controls = _TokenBucket(config.control_rate, config.control_burst, now)
        self._settings = _TokenBucket(config.settings_rate, config.settings_burst, now)
        self._resets = _TokenBucket(config.reset_rate, config.reset_burst, now)
        self.on_made = None  # called with the connection once it has its transport
        self.on_settings = None  # called once the peer's first SETTINGS arrived
        self.on_closed = None  # called with the reason once the connection ended
        self.on_capacity = None  # called when a stream closes or limits change

    def __repr__(self):
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"<H2Connection {'client' if self.is_client else 'server'} {peer}>"

    # -- lifecycle ------------------------------------------------------------

    def connectionMade(self):
        # DATA goes out only while the transport takes it, so what a peer that stops
        # reading costs us stays in its streams (within its windows, in the budget)
        # and their senders are not credited for bytes stuck in a socket buffer.
        self.transport.registerProducer(self, True)
        if self.on_made is not None:
            self.on_made(self)
        settings = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, self.config.initial_window),
            (SETTINGS_MAX_HEADER_LIST_SIZE, self.config.max_header_list_size),
            (SETTINGS_HEADER_TABLE_SIZE, self.config.header_table_size),
        ]
        if not self.is_client:
            settings.append((SETTINGS_MAX_CONCURRENT_STREAMS, self.config.max_concurrent_streams))
        if self._announce_proxy:
            settings.append((SETTINGS_GRPCMUX_PROXY, 1))
        payload = b"".join(_SETTING.pack(k, v) for k, v in settings)
        out = [PREFACE] if self.is_client else []
        out.append(frame_header(len(payload), TYPE_SETTINGS, 0, 0) + payload)
        # The connection window is credited on receipt: open it wide at once.
        out.append(self._window_update_frame(0, MAX_WINDOW - DEFAULT_WINDOW))
        self._write_sequence(out)
        if self.config.preface_timeout:
            self._preface_timer = self.clock.callLater(
                self.config.preface_timeout, self._preface_timed_out)
        self._arm_idle_timer()

    def connectionLost(self, reason=None):
        if self.closed:
            return
        self.closed = True
        self._cancel_timers()
        streams, self.streams = list(self.streams.values()), {}
        self._blocked.clear()
        for stream in streams:
            self._forget_pending(stream)
            if not stream.closed:
                stream.reset = True
                stream.handler.stream_reset(stream, None)
        waiters, self._close_waiters = self._close_waiters, []
        if self.on_closed is not None:
            self.on_closed(reason)
        for waiter in waiters:
            waiter.callback(None)

    def when_closed(self):
        if self.closed:
            return succeed(None)
        d = Deferred()
        self._close_waiters.append(d)
        return d

    def _cancel_timers(self):
        for timer in (self._preface_timer, self._idle_timer, self._ack_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._preface_timer = self._idle_timer = None

    def _preface_timed_out(self):
        self._preface_timer = None
        self._log.info("HTTP/2 peer {peer} sent no preface and SETTINGS in {seconds:g} s",
                       peer=self._peer(), seconds=self.config.preface_timeout)
        self.close(ERROR_SETTINGS_TIMEOUT, "no SETTINGS")

    def _arm_idle_timer(self):
        if not self.config.idle_timeout or self.closed:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = self.clock.callLater(self.config.idle_timeout, self._idle)

    def _idle(self):
        self._idle_timer = None
        if not self.streams:
            self.close(ERROR_NO_ERROR, "idle")

    def _peer(self):
        return self.transport.getPeer() if self.transport is not None else None

    def go_away(self, code=ERROR_NO_ERROR, debug=b""):
        """Send GOAWAY (once): the peer opens no more streams; ours go on."""
        if self.go_away_sent or self.closed:
            return
        self.go_away_sent = True
        payload = _GOAWAY.pack(self.last_peer_stream_id, code) + debug
        self._write(frame_header(len(payload), TYPE_GOAWAY, 0, 0) + payload)

    def drain(self):
        """Graceful close: GOAWAY, then close once no stream is left."""
        self.go_away()
        if not self.streams:
            self.transport.loseConnection()

    def close(self, code, message=""):
        """A connection error: GOAWAY(code) and close, every stream reset."""
        if self.closed:
            return
        self.go_away(code, message.encode("ascii", "replace")[:256])
        self.transport.loseConnection()
        self.connectionLost(H2ConnectionError(code, message))

    def abort(self):
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()
        self.connectionLost(H2ConnectionError(ERROR_NO_ERROR, "aborted"))

    # -- what the router calls ----------------------------------------------------

    @property
    def receive_credit_owed(self):
        """DATA bytes received on the connection and not yet credited back to the
        peer (a WINDOW_UPDATE on stream 0 goes out once they reach half the window)."""
        return self._recv_unacked

    def skip_stream_ids(self, next_id):
        """Make ``next_id`` the id of the next stream we open (client role).

        The ids skipped are never used (RFC 9113 section 5.1.1 allows it), which
        brings a connection to the end of its id space without opening a billion
        streams first.
        """
        if next_id < self._next_stream_id or (next_id - self._next_stream_id) % 2:
            raise ValueError(f"stream id {next_id} is not one of ours still unused")
        self._next_stream_id = next_id

    def can_open_stream(self):
        """Whether a new stream may be opened now (client role)."""
        if self.closed or self.go_away_received is not None or self.go_away_sent:
            return False
        if self._next_stream_id > _LAST_USABLE_STREAM_ID:
            return False
        return self.peer_max_streams is None or len(self.streams) < self.peer_max_streams

    def open_stream(self, handler):
        """A new stream of ours (client role); send its headers next."""
        stream = Stream(self, self._next_stream_id, handler)
        self._next_stream_id += 2
        self.streams[stream.id] = stream
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
            self._idle_timer = None
        return stream

    def send_headers(self, stream, headers, end_stream=False):
        """HEADERS for ``stream``; trailers (end_stream) wait behind pending DATA."""
        if stream.local_closed or self.closed:
            return
        if stream.queued or stream.end_queued:
            stream.trailers_queued = headers
            stream.end_queued = True
            return
        self._write_headers(stream, headers, end_stream)
        if end_stream:
            self._local_end(stream)

    def _write_headers(self, stream, headers, end_stream):
        block = self._encoder.encode(headers)
        limit = self.peer_max_frame_size
        flags = FLAG_END_STREAM if end_stream else 0
        if len(block) <= limit:
            self._write(
                frame_header(len(block), TYPE_HEADERS, flags | FLAG_END_HEADERS, stream.id)
                + block)
            return
        frames = []
        for offset in range(0, len(block), limit):
            piece = block[offset:offset + limit]
            last = offset + limit >= len(block)
            kind = TYPE_HEADERS if offset == 0 else TYPE_CONTINUATION
            piece_flags = (flags if offset == 0 else 0) | (FLAG_END_HEADERS if last else 0)
            frames.append(frame_header(len(piece), kind, piece_flags, stream.id) + piece)
        self._write_sequence(frames)

    def send_data(self, stream, data, end_stream=False):
        """DATA for ``stream``, sent as the peer's windows allow."""
        if stream.local_closed or self.closed:
            return
        if data:
            stream.queued.append(data)
            stream.queued_bytes += len(data)
            if self.budget is not None:
                self.budget.add(len(data))
        if end_stream:
            stream.end_queued = True
        self._flush_stream(stream)

    def credit(self, stream, count):
        """Let the peer send ``count`` more bytes on ``stream`` (they were forwarded)."""
        if stream.remote_closed or stream.reset or self.closed:
            return
        if self.budget is not None and self.budget.over:
            self.budget.defer(self, stream, count)
            return
        stream.uncredited += count
        if stream.uncredited * 2 >= self.config.initial_window:
            increment, stream.uncredited = stream.uncredited, 0
            stream.recv_window += increment
            self._write(self._window_update_frame(stream.id, increment))

    def reset_stream(self, stream, code):
        """RST_STREAM ``code``: the stream ends at once on both sides."""
        if stream.reset or self.closed:
            return
        if not stream.closed:
            self._write(frame_header(4, TYPE_RST_STREAM, 0, stream.id) + _U32.pack(code))
        stream.reset = True
        self._stream_closed(stream)

    # -- sending ------------------------------------------------------------

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        for stream in list(self.streams.values()):
            if self._paused:
                break
            if stream.queued or stream.end_queued:
                self._flush_stream(stream)

    def stopProducing(self):
        pass  # connectionLost follows

    def _flush_stream(self, stream):
        """Send what the windows allow of ``stream``'s pending DATA (then trailers)."""
        if self._paused:
            return
        sent = 0
        pending = stream.queued
        frames = []
        max_frame = self.peer_max_frame_size
        while pending:
            allowed = min(stream.send_window, self.send_window, max_frame)
            if allowed <= 0:
                break
            piece = pending[0]
            if len(piece) > allowed:
                pending[0] = piece[allowed:]
                piece = piece[:allowed]
            else:
                pending.popleft()
            size = len(piece)
            stream.send_window -= size
            self.send_window -= size
            sent += size
            end = not pending and stream.end_queued and stream.trailers_queued is None
            frames.append(frame_header(size, TYPE_DATA, FLAG_END_STREAM if end else 0, stream.id))
            frames.append(piece)
            self._controls.give(_EARNED_CONTROLS)  # the peer answers DATA with WINDOW_UPDATE
        if not pending:
            if stream.blocked:
                stream.blocked = False
                self._unblock(stream)
        elif not stream.blocked and self.send_window <= 0:
            stream.blocked = True
            self._blocked.append(stream)
        ended = False
        if not pending and stream.end_queued:
            stream.end_queued = False
            ended = True
            trailers, stream.trailers_queued = stream.trailers_queued, None
            if trailers is not None:
                if frames:
                    self._write_sequence(frames)
                    frames = []
                self._write_headers(stream, trailers, True)
            elif not frames:
                frames.append(frame_header(0, TYPE_DATA, FLAG_END_STREAM, stream.id))
        if frames:
            self._write_sequence(frames)
        if sent:
            stream.queued_bytes -= sent
            if self.budget is not None:
                self.budget.remove(sent)
        if ended:
            self._local_end(stream)
        if sent:
            stream.handler.stream_drained(stream, sent)

    def _unblock(self, stream):
        try:
            self._blocked.remove(stream)
        except ValueError:
            pass

    def _local_end(self, stream):
        stream.local_closed = True
        if stream.closed:
            self._stream_closed(stream)
        elif not self.is_client:
            # The response is complete: ask the caller to stop sending (section 8.1).
            self.reset_stream(stream, ERROR_NO_ERROR)

    def _forget_pending(self, stream):
        if stream.queued_bytes and self.budget is not None:
            self.budget.remove(stream.queued_bytes)
        stream.queued.clear()
        stream.queued_bytes = 0
        stream.end_queued = False
        stream.trailers_queued = None

    def _stream_closed(self, stream):
        if self.streams.pop(stream.id, None) is None:
            return
        self._forget_pending(stream)
        if stream.blocked:
            stream.blocked = False
            self._unblock(stream)
        if not self.streams:
            if self.go_away_sent or self.go_away_received is not None:
                self.transport.loseConnection()
            else:
                self._arm_idle_timer()
        if self.on_capacity is not None:
            self.on_capacity(self)

    def _window_update_frame(self, stream_id, increment):
        return frame_header(4, TYPE_WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)

    # -- receiving ----------------------------------------------------------

    @batched
    def dataReceived(self, data):
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._preface_pending:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(data):
                    return self.close(ERROR_PROTOCOL_ERROR, "not an HTTP/2 client preface")
                self._buffer = data
                return
            if not data.startswith(PREFACE):
                return self.close(ERROR_PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._preface_pending = False
            data = data[len(PREFACE):]
        offset = 0
        size = len(data)
        max_frame = MAX_FRAME_SIZE_LIMIT if self.is_client else DEFAULT_MAX_FRAME_SIZE
        try:
            while size - offset >= FRAME_HEADER_LENGTH:
                length, frame_type, flags, stream_id = parse_frame_header(data, offset)
                if length > max_frame:
                    raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "frame too large")
                end = offset + FRAME_HEADER_LENGTH + length
                if end > size:
                    break
                payload = data[offset + FRAME_HEADER_LENGTH:end]
                offset = end
                if not self.settings_received and frame_type != TYPE_SETTINGS:
                    raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "first frame is not SETTINGS")
                self._frame(frame_type, flags, stream_id, payload)
                if self.closed:
                    return
        except H2ConnectionError as error:
            self._log.info("HTTP/2 connection error with {peer}: {error}",
                           peer=self._peer(), error=error)
            self.close(error.code, str(error))
            return
        if offset < size:
            self._buffer = data[offset:]

    def _frame(self, frame_type, flags, stream_id, payload):
        if self._header_block is not None and frame_type != TYPE_CONTINUATION:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "header block interrupted")
        if frame_type == TYPE_DATA:
            self._data_frame(flags, stream_id, payload)
        elif frame_type == TYPE_HEADERS:
            self._headers_frame(flags, stream_id, payload)
        elif frame_type == TYPE_CONTINUATION:
            self._continuation_frame(flags, stream_id, payload)
        elif frame_type == TYPE_RST_STREAM:
            self._rst_frame(stream_id, payload)
        elif frame_type == TYPE_SETTINGS:
            self._settings_frame(flags, stream_id, payload)
        elif frame_type == TYPE_WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif frame_type == TYPE_PING:
            self._ping_frame(flags, stream_id, payload)
        elif frame_type == TYPE_GOAWAY:
            self._go_away_frame(stream_id, payload)
        elif frame_type == TYPE_PRIORITY:
            if stream_id == 0:
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "PRIORITY of bad size")
            self._control()
        elif frame_type == TYPE_PUSH_PROMISE:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # Unknown frame types are ignored (section 4.1), but count as control frames.
        else:
            self._control()

    def _control(self):
        if not self._controls.take():
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "too many control frames")

    def _data_frame(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_unacked += length
        if self._recv_unacked * 2 >= MAX_WINDOW:
            self._write(self._window_update_frame(0, self._recv_unacked))
            self._recv_unacked = 0
        data = _unpad(flags, payload) if flags & FLAG_PADDED else payload
        end_stream = bool(flags & FLAG_END_STREAM)
        if data:
            self._controls.give(_EARNED_CONTROLS)
        elif not end_stream:
            self._control()
        stream = self.streams.get(stream_id)
        if stream is None:
            # Closed: DATA the peer sent before it saw our RST_STREAM or END_STREAM
            # is ignored (RFC 9113 section 5.1); idle is an error.
            if self._is_idle(stream_id):
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return
        if stream.remote_closed:  # half-closed (remote): a stream error
            self._stream_error(stream, ERROR_STREAM_CLOSED)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._stream_error(stream, ERROR_FLOW_CONTROL_ERROR)
            return
        padding = length - len(data)
        if padding:
            self.credit(stream, padding)
        if end_stream:
            stream.remote_closed = True
        stream.handler.stream_data(stream, data, end_stream)
        if end_stream and stream.closed:
            self._stream_closed(stream)

    def _unknown_stream(self, stream_id, what):
        """A frame for a stream we do not have: closed (ignore or reset) or idle (error)."""
        if self._is_idle(stream_id):
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, f"{what} on idle stream {stream_id}")
        self._control()
        self._write(
            frame_header(4, TYPE_RST_STREAM, 0, stream_id) + _U32.pack(ERROR_STREAM_CLOSED))

    def _is_idle(self, stream_id):
        ours = (stream_id % 2 == 1) == self.is_client
        if ours:
            return stream_id >= self._next_stream_id
        return stream_id > self.last_peer_stream_id

    def peer_caused_reset(self):
        """Count a reset the peer provoked (a stream error) as one it sent: past the
        reset rate it is a rapid reset too ("MadeYouReset", CVE-2025-8671)."""
        if not self.is_client and not self._resets.take():
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "too many stream errors")

    def _stream_error(self, stream, code):
        self.peer_caused_reset()
        handler = stream.handler
        self.reset_stream(stream, code)
        handler.stream_reset(stream, code)

    def _headers_frame(self, flags, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & FLAG_PADDED:
            payload = _unpad(flags, payload)
        if flags & FLAG_PRIORITY:
            if len(payload) < 5:
                raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "HEADERS priority truncated")
            payload = payload[5:]
        if flags & FLAG_END_HEADERS:
            self._header_block_done(stream_id, flags, payload)
        else:
            self._header_block = (stream_id, flags, [payload], len(payload), 0)
            self._check_block_size(len(payload))

    def _continuation_frame(self, flags, stream_id, payload):
        block = self._header_block
        if block is None or block[0] != stream_id:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "unexpected CONTINUATION")
        first_stream, first_flags, fragments, size, count = block
        fragments.append(payload)
        size += len(payload)
        count += 1
        self._check_block_size(size)
        if count > self.config.max_continuations:
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if flags & FLAG_END_HEADERS:
            self._header_block = None
            self._header_block_done(stream_id, first_flags, b"".join(fragments))
        else:
            self._header_block = (first_stream, first_flags, fragments, size, count)

    def _check_block_size(self, size):
        if size > self.config.max_header_block:
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "header block too large")

    def _decode(self, block):
        try:
            headers = self._decoder.decode(block)
        except OversizedHeaderListError:
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "header list too large") from None
        except (HPACKError, IndexError, ValueError) as error:
            raise H2ConnectionError(ERROR_COMPRESSION_ERROR, f"bad header block: {error}") from None
        return headers

    def _header_block_done(self, stream_id, flags, block):
        headers = self._decode(block)  # always, to keep the HPACK table in step
        self._controls.give(_EARNED_CONTROLS)
        end_stream = bool(flags & FLAG_END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.is_client or not self._is_idle(stream_id) or stream_id % 2 == 0:
                if self._is_idle(stream_id):
                    raise H2ConnectionError(ERROR_PROTOCOL_ERROR,
                                           f"HEADERS on idle stream {stream_id}")
                self._unknown_stream(stream_id, "HEADERS")
                return
            self._new_peer_stream(stream_id, headers, end_stream)
            return
        if stream.remote_closed:
            self._stream_error(stream, ERROR_STREAM_CLOSED)
            return
        if end_stream:
            stream.remote_closed = True
        stream.handler.stream_headers(stream, headers, end_stream)
        if end_stream and stream.closed:
            self._stream_closed(stream)

    def _new_peer_stream(self, stream_id, headers, end_stream):
        self.last_peer_stream_id = stream_id
        if self.go_away_sent or len(self.streams) >= self.config.max_concurrent_streams:
            self._control()
            self._write(
                frame_header(4, TYPE_RST_STREAM, 0, stream_id) + _U32.pack(ERROR_REFUSED_STREAM))
            return
        stream = Stream(self, stream_id, None)
        stream.remote_closed = end_stream
        self.streams[stream_id] = stream
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
            self._idle_timer = None
        stream.handler = self.on_new_stream(self, stream, headers, end_stream)
        if stream.handler is None:  # refused and answered already
            stream.handler = _NO_HANDLER

    def _rst_frame(self, stream_id, payload):
        if stream_id == 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "RST_STREAM of bad size")
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "RST_STREAM on idle stream")
            self._control()
            return
        if not self.is_client and not self._resets.take():
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "too many stream resets")
        (code,) = _U32.unpack(payload)
        stream.reset = True
        self._stream_closed(stream)
        stream.handler.stream_reset(stream, code)

    def _settings_frame(self, flags, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "SETTINGS on a stream")
        self._control()
        if flags & FLAG_ACK:
            if payload:
                raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "SETTINGS of bad size")
        if not self._settings.take():
            raise H2ConnectionError(ERROR_ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        # The last value of each setting counts: a frame that repeats one (2,730 fit in
        # 16 KiB) must not cost a pass over every stream per repeat.
        values = {}
        for offset in range(0, len(payload), 6):
            identifier, value = _SETTING.unpack_from(payload, offset)
            values[identifier] = value
        for identifier, value in values.items():
            self._setting(identifier, value)
        self._write(frame_header(0, TYPE_SETTINGS, FLAG_ACK, 0))
        first = not self.settings_received
        self.settings_received = True
        if first:
            if self._preface_timer is not None and self._preface_timer.active():
                self._preface_timer.cancel()
            self._preface_timer = None
            if self.on_settings is not None:
                self.on_settings(self)
        elif self.on_capacity is not None:
            self.on_capacity(self)

    def _setting(self, identifier, value):
        if identifier == SETTINGS_HEADER_TABLE_SIZE:
            self._encoder.header_table_size = min(value, self.config.header_table_size)
        elif identifier == SETTINGS_ENABLE_PUSH:
            if value > 1:
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        elif identifier == SETTINGS_MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif identifier == SETTINGS_INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise H2ConnectionError(ERROR_FLOW_CONTROL_ERROR, "initial window too large")
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            if delta:
                for stream in list(self.streams.values()):
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ConnectionError(ERROR_FLOW_CONTROL_ERROR, "window overflow")
                if delta > 0:
                    for stream in list(self.streams.values()):
                        if stream.queued or stream.end_queued:
                            self._flush_stream(stream)
        elif identifier == SETTINGS_MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
            self.peer_max_frame_size = value
        elif identifier == SETTINGS_MAX_HEADER_LIST_SIZE:
            self.peer_max_header_list = value

    def _window_update(self, stream_id, payload):
        if len(payload) != 4:
            raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "WINDOW_UPDATE of bad size")
        (increment,) = _U32.unpack(payload)
        increment &= 0x7FFFFFFF
        self._control()
        if stream_id == 0:
            if increment == 0:
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(ERROR_FLOW_CONTROL_ERROR, "connection window overflow")
            # Blocked streams take the window in turn (one still short goes to the
            # back) and only while there is some: a 1-byte update is one send, not a
            # pass over every blocked stream with the first one served each time.
            blocked = self._blocked
            while blocked and self.send_window > 0 and not self._paused:
                stream = blocked.popleft()
                stream.blocked = False
                if stream.id in self.streams:
                    self._flush_stream(stream)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return
        if increment == 0:
            self._stream_error(stream, ERROR_PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream, ERROR_FLOW_CONTROL_ERROR)
            return
        if stream.queued or stream.end_queued:
            self._flush_stream(stream)

    def _ping_frame(self, flags, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "PING of bad size")
        self._control()
        if not flags & FLAG_ACK:
            self._hold_ack(frame_header(8, TYPE_PING, FLAG_ACK, 0) + payload)

    def _hold_ack(self, frame):
        """Send a PING ACK with our next write, or after ``ping_ack_delay``.

        gRPC peers ping with their traffic (BDP estimation): the ACK then rides on
        the answer to that traffic instead of costing both sides a write and a
        wakeup of its own.
        """
        self._held_acks.append(frame)
        delay = self.config.ping_ack_delay
        if not delay or len(self._held_acks) >= _MAX_HELD_ACKS:
            self._write_sequence(())
        elif self._ack_timer is None:
            self._ack_timer = self.clock.callLater(delay, self._release_acks)

    def _release_acks(self):
        self._ack_timer = None
        if not self.closed:
            self._write_sequence(())

    def _take_acks(self):
        """The held PING ACKs, to be written now: their timer is off."""
        acks, self._held_acks = self._held_acks, []
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return acks

    def _write(self, data):
        """Write to the transport, behind any held PING ACKs."""
        if self._held_acks:
            self._write_sequence((data,))
            return
        self.transport.write(data)
        BATCH.wrote(self.transport)

    def _write_sequence(self, frames):
        """Write ``frames`` to the transport, behind any held PING ACKs."""
        if self._held_acks:
            frames = self._take_acks() + list(frames)
        self.transport.writeSequence(frames)
        BATCH.wrote(self.transport)

    def _go_away_frame(self, stream_id, payload):
        if stream_id != 0:
            raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ConnectionError(ERROR_FRAME_SIZE_ERROR, "GOAWAY of bad size")
        self._control()
        last_stream_id, code = _GOAWAY.unpack_from(payload)
        last_stream_id &= 0x7FFFFFFF
        self.go_away_received = last_stream_id
        if self.is_client:
            # Streams the peer never saw may be retried elsewhere: REFUSED_STREAM.
            for stream in [s for s in self.streams.values() if s.id > last_stream_id]:
                stream.reset = True
                self._stream_closed(stream)
                stream.handler.stream_reset(stream, ERROR_REFUSED_STREAM)
            if self.on_capacity is not None:
                self.on_capacity(self)
        if not self.streams:
            self.transport.loseConnection()


def _unpad(flags, payload):
    if not payload:
        raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ConnectionError(ERROR_PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - pad]


class _NoHandler:
    """The handler of a stream the router refused: its frames are dropped."""

    def stream_headers(self, stream, headers, end_stream):
        pass

    def stream_data(self, stream, data, end_stream):
        stream.connection.credit(stream, len(data))

    def stream_reset(self, stream, code):
        pass

    def stream_drained(self, stream, count):
        pass


_NO_HANDLER = _NoHandler()
