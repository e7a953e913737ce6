"""YamuxSession: a yamux session as a Twisted protocol, and its factory.

The session parses frames, keeps the stream table, hands peer-opened streams
to ``stream_factory`` and sends: control frames (ACK, RST, PING, GO_AWAY,
WINDOW_UPDATE) first, then DATA round-robin across streams, one bounded
frame per stream per turn.  It registers itself as its transport's producer
and sends no DATA while the transport has paused it.
"""

from collections import deque

from twisted.internet import defer, error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

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
)
from .frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_INTERNAL_ERROR,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    INITIAL_STREAM_WINDOW,
    MAX_STREAM_ID,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameParser,
    encode_header,
)
from .stream import YamuxStream

# DATA bytes sent in one flush before yielding to the reactor (fairness with
# everything else the reactor runs; transports that never pause, too).
_FLUSH_BUDGET = 1024 * 1024
# Collected frames are handed to the transport at least this often in a flush.
_WRITE_SIZE = 256 * 1024


@implementer(IPushProducer)
class YamuxSession(Protocol):
    """A yamux session; ``is_client`` picks odd (client) or even (server) stream ids.

    Streams the peer opens are accepted at once: ``stream_factory.buildProtocol``
    gets a StreamAddress, the ACK is queued before the protocol is connected, and
    a factory that builds nothing (or no factory) means RST.  The accept backlog
    counts peer-opened streams whose ACK has not been written to the transport
    yet (SYNs arriving in one read); a SYN beyond it is reset, and so is a SYN
    that would take the open streams past ``config.max_streams``.

    Control frames raised by API calls (SYN, PING, GO_AWAY, RST) are written at
    once; those raised while receiving are written together at the end of
    ``dataReceived``.  DATA is sent at the end of ``dataReceived`` or from a
    ``callLater(0)`` flush, so writes made in one reactor turn are coalesced
    (with a task.Clock, ``clock.advance(0)`` sends them).

    Public state: ``is_client``, ``config``, ``stream_factory`` (replaceable),
    ``streams`` (id -> YamuxStream, read-only use), ``closed``,
    ``go_away_received``, ``go_away_sent``, ``clock``.
    """

    _log = Logger()

    def __init__(self, is_client, stream_factory=None, config=None, clock=None):
        self.is_client = bool(is_client)
        self.stream_factory = stream_factory
        self.config = config if config is not None else YamuxConfig()
        self._clock = clock
        self.streams = {}
        self.closed = False
        self.go_away_received = False
        self.go_away_sent = False
        self._next_stream_id = 1 if self.is_client else 2
        self._parser = FrameParser(self)
        self._control = []
        self._ready = deque()
        self._writing_paused = False
        self._reading_paused = False
        self._paused_control_bytes = 0
        self._in_receive = False
        self._flushing = False
        self._flush_call = None
        self._out = None  # while flushing: the pieces of the next transport write
        self._out_len = 0
        self._out_control = 0  # control bytes among them
        self._unacked_incoming = 0
        self._stream_limit_logged = False
        self._pings = {}
        self._ping_id = 0
        self._keepalive_call = None
        self._close_reason = None
        self._close_waiters = []
        self._go_away_waiters = []
        self.bytes_received = 0  # every byte read from and written to the transport
        self.bytes_sent = 0

    def __repr__(self):
        role = "client" if self.is_client else "server"
        return f"<YamuxSession {role} streams={len(self.streams)} closed={self.closed}>"

    @property
    def clock(self):
        """The IReactorTime used for timers (the global reactor unless one was given)."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    # -- Protocol ----------------------------------------------------------

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        tune_transport(self.transport)
        if self.config.enable_keepalive:
            self._schedule_keepalive()

    def dataReceived(self, data):
        self.bytes_received += len(data)
        if self.closed:
            return
        self._in_receive = True
        try:
            self._parser.feed(data)
        except ProtocolError as exc:
            self._in_receive = False
            self._log.warn("yamux protocol error from {peer}: {error}",
                           peer=self._peer_address(), error=exc)
            self._fail(exc, GO_AWAY_PROTOCOL_ERROR)
            return
        except Exception as exc:
            self._in_receive = False
            self._log.failure("yamux session failed while receiving")
            self._fail(exc, GO_AWAY_INTERNAL_ERROR)
            return
        self._in_receive = False
        if not self.closed:
            self._flush()

    def connectionLost(self, reason=None):
        if not self.closed:
            value = reason.value if reason is not None else error.ConnectionDone()
            self._shutdown(value, lose_transport=False)

    # -- public API --------------------------------------------------------

    def open_stream(self, protocol):
        """Open a stream (SYN) and connect ``protocol`` to it; data may be written at once."""
        self._check_can_open()
        stream_id = self._next_stream_id
        self._next_stream_id = stream_id + 2
        stream = YamuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self._send_control(self._window_open_frame(stream, FLAG_SYN))
        stream._open_timer = self.clock.callLater(
            self.config.stream_open_timeout, self._open_timed_out, stream
        )
        stream._attach(protocol)
        return stream

    def ping(self):
        """Ping the peer; the Deferred fires with the round-trip time in seconds."""
        if self.closed:
            return defer.fail(SessionClosed("session closed"))
        ping_id = self._ping_id
        self._ping_id = (ping_id + 1) & MAX_STREAM_ID
        result = defer.Deferred()
        clock = self.clock
        timeout = clock.callLater(
            self.config.connection_write_timeout, self._ping_timed_out, ping_id)
        self._pings[ping_id] = (result, clock.seconds(), timeout)
        self._send_control(encode_header(TYPE_PING, FLAG_SYN, 0, ping_id))
        return result

    def go_away(self, code=GO_AWAY_NORMAL):
        """Tell the peer that no new streams will be accepted; existing ones go on."""
        if self.closed:
            return
        self.go_away_sent = True
        self._send_control(encode_header(TYPE_GO_AWAY, 0, 0, code))

    def close(self, code=GO_AWAY_NORMAL):
        """Send GoAway(code), then close the transport; streams get connectionLost."""
        if self.closed:
            return
        self.go_away(code)
        reason = None if code == GO_AWAY_NORMAL else SessionClosed(f"closed with GoAway({code})")
        self._shutdown(reason, lose_transport=True)

    def abort(self):
        """Drop the transport at once."""
        if not self.closed:
            self._shutdown(None, lose_transport=True, abort=True)

    def when_go_away(self):
        """A Deferred firing when the peer sends GoAway(0): it takes no new streams.

        Never fires if the session closes without one.
        """
        if self.go_away_received:
            return defer.succeed(None)
        result = defer.Deferred()
        self._go_away_waiters.append(result)
        return result

    def when_closed(self):
        """A Deferred firing once the session ended (fires at once if it has).

        The result is None after close(GO_AWAY_NORMAL) or abort(), otherwise the
        exception that ended it: the transport's reason (ConnectionDone, ...),
        ProtocolError, PingTimeout, StreamOpenTimeout, RemoteGoAwayError or
        SessionClosed (close with an error code).  Fires when the session stops,
        which may be before the transport has finished closing.
        """
        if self.closed:
            return defer.succeed(self._close_reason)
        result = defer.Deferred()
        self._close_waiters.append(result)
        return result

    # -- IPushProducer (the transport's write side) ------------------------

    def pauseProducing(self):
        self._writing_paused = True

    def resumeProducing(self):
        self._writing_paused = False
        self._paused_control_bytes = 0
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._flush()

    def stopProducing(self):
        self._writing_paused = True

    # -- frame handler (called by FrameParser) -----------------------------

    def frame_received(self, header):
        ftype = header.type
        if ftype <= TYPE_WINDOW_UPDATE:
            return self._stream_frame(header)
        if ftype == TYPE_PING:
            if header.flags & FLAG_SYN:
                self._send_control(encode_header(TYPE_PING, FLAG_ACK, 0, header.length))
            elif header.flags & FLAG_ACK:
                self._ping_answered(header.length)
            return False
        code = header.length
        if code == GO_AWAY_NORMAL:
            self.go_away_received = True
            waiters, self._go_away_waiters = self._go_away_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        else:
            self._log.warn("peer {peer} closed the session with GoAway({code})",
                           peer=self._peer_address(), code=code)
            self._shutdown(RemoteGoAwayError(f"peer sent GoAway({code})"), lose_transport=True)
        return False

    def data_received(self, header, chunk, last):
        stream = self.streams.get(header.stream_id)
        if stream is None:
            return
        stream._data_received(chunk)
        if last and header.flags & FLAG_FIN and not stream.disconnected:
            stream._remote_fin()

    def _stream_frame(self, header):
        stream_id = header.stream_id
        flags = header.flags
        stream = self.streams.get(stream_id)
        if flags & FLAG_SYN:
            if stream is not None:
                raise ProtocolError(f"duplicate SYN for stream {stream_id}")
            stream = self._incoming_stream(stream_id)
        if stream is None:
            # Unknown or closed stream (Go sends updates for closed ones): ignore.
            return False
        if flags & FLAG_ACK:
            stream._remote_ack()
        if flags & FLAG_RST:
            stream._remote_rst()
            return False
        if header.type == TYPE_WINDOW_UPDATE:
            stream._window_update(header.length)
            if flags & FLAG_FIN and not stream.disconnected:
                stream._remote_fin()
            return False
        length = header.length
        if length > stream._recv_window:
            raise ProtocolError(
                f"stream {stream_id}: {length} bytes exceed the receive window "
                f"({stream._recv_window} left)"
            )
        stream._recv_window -= length
        if length:
            return True
        if flags & FLAG_FIN and not stream.disconnected:
            stream._remote_fin()
        return False

    def _incoming_stream(self, stream_id):
        if stream_id == 0 or (stream_id & 1) == self.is_client:
            raise ProtocolError(f"peer opened stream {stream_id} with a wrong id")
        if self.go_away_sent:
            self._send_rst(stream_id)
            return None
        if len(self.streams) >= self.config.max_streams:
            if not self._stream_limit_logged:  # once: a flood of SYNs is one event
                self._stream_limit_logged = True
                self._log.warn("peer {peer} opened more than {max_streams} streams; "
                               "resetting the extra ones", peer=self._peer_address(),
                               max_streams=self.config.max_streams)
            self._send_rst(stream_id)
            return None
        if self._unacked_incoming >= self.config.accept_backlog:
            self._log.warn("accept backlog exceeded, resetting stream {stream_id}",
                           stream_id=stream_id)
            self._send_rst(stream_id)
            return None
        protocol = None
        if self.stream_factory is not None:
            try:
                protocol = self.stream_factory.buildProtocol(
                    StreamAddress(self._peer_address(), stream_id))
            except Exception:
                self._log.failure("stream factory failed for stream {stream_id}",
                                  stream_id=stream_id)
        if protocol is None:
            self._send_rst(stream_id)
            return None
        stream = YamuxStream(self, stream_id)
        stream.established = True
        self.streams[stream_id] = stream
        self._unacked_incoming += 1
        self._send_control(self._window_open_frame(stream, FLAG_ACK))
        try:
            stream._attach(protocol)
        except Exception:
            self._log.failure("stream {stream_id}: makeConnection failed", stream_id=stream_id)
            stream.abortConnection()
        if stream.disconnected:
            return None
        return stream

    # -- sending -----------------------------------------------------------

    def _window_open_frame(self, stream, flag):
        """The SYN/ACK window update, advertising any window above 256 KiB."""
        delta = self.config.max_stream_window_size - INITIAL_STREAM_WINDOW
        stream._recv_window += delta
        return encode_header(TYPE_WINDOW_UPDATE, flag, stream.stream_id, delta)

    def _send_rst(self, stream_id):
        self._send_control(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    def _send_control(self, frame):
        """Queue a control frame; written at once unless a receive or flush is running."""
        if self.closed:
            return
        self._control.append(frame)
        if not self._in_receive and not self._flushing:
            self._write_control()

    def _write_control(self):
        control = self._control
        self._control = []
        self._unacked_incoming = 0
        data = control[0] if len(control) == 1 else b"".join(control)
        self.bytes_sent += len(data)
        if self._out is not None:
            self._out.append(data)
            self._out_len += len(data)
            self._out_control += len(data)
        else:
            self.transport.write(data)
            self._control_written(len(data))

    def _control_written(self, count):
        """Count control bytes that went into a full transport (this write may have
        filled it); past max_control_buffer, stop reading: a peer that is not reading
        cannot keep making us answer (pings, window updates) into its buffer."""
        if self._writing_paused:
            self._paused_control_bytes += count
            if (self._paused_control_bytes > self.config.max_control_buffer
                    and not self._reading_paused):
                self._reading_paused = True
                self.transport.pauseProducing()

    def _schedule(self, stream):
        """Put ``stream`` in the round-robin queue and make sure a flush comes."""
        if not stream._scheduled and not self.closed:
            stream._scheduled = True
            self._ready.append(stream)
            if self._flush_call is None and not self._in_receive and not self._flushing:
                self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self):
        """Write control frames, then DATA round-robin while the transport takes it.

        The frames are collected (headers, and bodies as views into the streams'
        buffers) and handed to the transport joined, one write per _WRITE_SIZE
        or less: a Twisted transport joins whatever is pending into one bytes
        before send(), so a single pending bytes is sent as it is, with no copy
        besides our join.  Past _WRITE_SIZE the transport gets what is collected,
        so a full transport pauses the flush as before.
        """
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if self._flushing or self.closed:
            return
        self._flushing = True
        self._out = out = []
        self._out_len = 0
        try:
            if self._control:
                self._write_control()
            ready = self._ready
            limit = self.config.max_frame_size
            budget = _FLUSH_BUDGET
            while ready and not self.closed:
                if self._out_len >= _WRITE_SIZE:
                    self._write_out()
                if self._writing_paused or self.closed:
                    break
                if budget <= 0:
                    self._flush_call = self.clock.callLater(0, self._flush)
                    break
                stream = ready.popleft()
                stream._scheduled = False
                if stream.disconnected:
                    continue
                before = stream._send_len
                counted = self.bytes_sent
                more = stream._send_turn(limit, out)
                budget -= before - stream._send_len + 1
                self._out_len += self.bytes_sent - counted
                if self._control and not self.closed:
                    self._write_control()
                if more and not stream._scheduled:
                    stream._scheduled = True
                    ready.append(stream)
        finally:
            self._flushing = False
            self._write_out()
            self._out = None

    def _write_out(self):
        """Hand what the flush collected to the transport as one bytes."""
        out = self._out
        if out:
            data = b"".join(out)
            out.clear()
            self._out_len = 0
            control, self._out_control = self._out_control, 0
            self.transport.write(data)
            if control:
                self._control_written(control)

    # -- streams -----------------------------------------------------------

    def _check_can_open(self):
        if self.closed or self.transport is None:
            raise SessionClosed("session closed")
        if self.go_away_received:
            raise GoAwayReceived("peer sent GoAway: no new streams")
        if self.go_away_sent:
            raise GoAwaySent("GoAway sent: no new streams")
        if len(self.streams) >= self.config.max_streams:
            raise StreamLimitReached(
                f"{len(self.streams)} streams are open, the session's limit (max_streams)")
        if self._next_stream_id >= MAX_STREAM_ID - 1:
            raise StreamIdsExhausted("no stream ids left in this session")

    def _stream_finished(self, stream):
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    def _open_timed_out(self, stream):
        stream._open_timer = None
        self._log.warn("stream {stream_id} not acknowledged in time, closing the session",
                       stream_id=stream.stream_id)
        self._shutdown(StreamOpenTimeout(f"stream {stream.stream_id} was not acknowledged"),
                       lose_transport=True)

    def _peer_address(self):
        return self.transport.getPeer() if self.transport is not None else None

    def _host_address(self):
        return self.transport.getHost() if self.transport is not None else None

    # -- ping and keepalive ------------------------------------------------

    def _ping_answered(self, ping_id):
        entry = self._pings.pop(ping_id, None)
        if entry is None:
            return
        result, started, timeout = entry
        timeout.cancel()
        result.callback(self.clock.seconds() - started)

    def _ping_timed_out(self, ping_id):
        result, _, _ = self._pings.pop(ping_id)
        result.errback(PingTimeout(f"ping not answered in {self.config.connection_write_timeout}s"))

    def _schedule_keepalive(self):
        if not self.closed:
            self._keepalive_call = self.clock.callLater(self.config.keepalive_interval,
                                                        self._keepalive)

    def _keepalive(self):
        self._keepalive_call = None
        self.ping().addCallbacks(lambda _: self._schedule_keepalive(), self._keepalive_failed)

    def _keepalive_failed(self, failure):
        if failure.check(PingTimeout):
            self._log.warn("keepalive ping to {peer} unanswered, closing the session",
                           peer=self._peer_address())
            # Abort: a peer that does not read would hold a polite close open forever.
            self._shutdown(failure.value, lose_transport=True, abort=True)
        # SessionClosed: the session ended anyway.

    # -- shutdown ----------------------------------------------------------

    def _fail(self, exc, code):
        """Send GoAway(code) and close the session because of ``exc``."""
        self.go_away(code)
        self._shutdown(exc, lose_transport=True)

    def _shutdown(self, reason, lose_transport, abort=False):
        """End the session: flush control frames, drop streams, timers and the transport."""
        if self.closed:
            return
        if self._control and self.transport is not None and not abort:
            self._write_control()
        if self._out:
            # Shut down during a flush: what it collected goes before the close.
            if abort or self.transport is None:
                self._out.clear()
            else:
                self._write_out()
        self.closed = True
        self._close_reason = reason
        self._parser.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        self._ready.clear()
        stream_reason = SessionClosed(f"session closed: {reason}" if reason else "session closed")
        for stream in list(self.streams.values()):
            stream._finish(stream_reason)
        self.streams.clear()
        pings, self._pings = self._pings, {}
        for result, _, timeout in pings.values():
            timeout.cancel()
            result.errback(SessionClosed("session closed before the ping was answered"))
        if lose_transport and self.transport is not None:
            self.transport.unregisterProducer()
            if abort and hasattr(self.transport, "abortConnection"):
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(reason)


class YamuxFactory(Factory):
    """Builds a YamuxSession per connection, all with the same settings."""

    def __init__(self, is_client, stream_factory=None, config=None, clock=None):
        self.is_client = is_client
        self.stream_factory = stream_factory
        self.config = config
        self.clock = clock

    def buildProtocol(self, addr):
        session = YamuxSession(self.is_client, self.stream_factory, self.config, self.clock)
        session.factory = self
        return session



# Bytes per recv(), per send(), and buffered before the producer is paused, on the
# transports that carry a tunnel's bytes. Twisted's 64 KiB (128 KiB per send) costs a
# reactor turn per 64 KiB at hundreds of MB/s; one default window (256 KiB) moved a
# 16 MiB server stream through grpcmux about 1.3x faster (benchmarks/grpc_bench.py).
IO_SIZE = 256 * 1024


def tune_transport(transport):
    """Turn Nagle off on a TCP (or TLS over TCP) transport and size its I/O in bulk.

    Frames are written whole, so nothing gains from coalescing; with Nagle on, a
    small write behind unacknowledged data (a call's HEADERS after the previous
    reply) waits for the peer's delayed ACK: 40 ms per unary call, measured.
    Transports without these knobs (a yamux stream, a test's fake) are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
    if isinstance(transport, FileDescriptor):
        transport.bufferSize = IO_SIZE
        transport.SEND_LIMIT = IO_SIZE
