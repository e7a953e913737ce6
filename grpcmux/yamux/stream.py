"""YamuxStream: one yamux stream as a Twisted transport.

The stream's place in the protocol is one ``StreamState`` (hashicorp/yamux's
stream states), moved only by ``transition`` on the flags sent and received.
Outbound bytes are buffered per stream and sent by the session's round-robin
sender within the peer's window; the registered producer is paused while
the window is spent or the buffer is above its high-water mark.  Inbound bytes
are delivered while the stream is producing and buffered (at most one window)
while it is paused; the receive window is credited only for bytes delivered.
"""

import enum
from collections import deque

from twisted.internet import error
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .address import StreamAddress
from .errors import ProtocolError, StreamReset
from .frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER_SIZE,
    INITIAL_STREAM_WINDOW,
    MAX_STREAM_WINDOW,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    encode_header,
)


class StreamState(enum.IntEnum):
    """Where a stream is in the protocol (hashicorp/yamux ``streamState``)."""

    INIT = 0
    SYN_SENT = 1
    SYN_RECEIVED = 2
    ESTABLISHED = 3
    LOCAL_CLOSE = 4  # our FIN is sent; the peer may still send
    REMOTE_CLOSE = 5  # the peer's FIN arrived; we may still send
    CLOSED = 6  # both FINs, or the session ended
    RESET = 7


INIT, SYN_SENT, SYN_RECEIVED, ESTABLISHED, LOCAL_CLOSE, REMOTE_CLOSE, CLOSED, RESET = StreamState
_OPEN = frozenset((SYN_SENT, SYN_RECEIVED, ESTABLISHED))
_FIN_SENT = frozenset((LOCAL_CLOSE, CLOSED))
_FIN_RECEIVED = frozenset((REMOTE_CLOSE, CLOSED))
_ENDED = frozenset((CLOSED, RESET))


def transition(state, flags, sent):
    """The state after a frame with ``flags`` was sent (``sent``) or received.

    SYN opens (INIT -> SYN_SENT / SYN_RECEIVED); the ACK answering it
    establishes; a FIN closes one direction, the second FIN both; RST resets
    from anywhere.  What does not apply leaves the state as it is: an ACK or
    SYN on an open stream, a repeated FIN (ignored), anything after
    CLOSED or RESET (late frames of a stream that is gone).
    """
    if flags & FLAG_RST:
        return RESET
    if state >= CLOSED:
        return state
    if flags & FLAG_SYN and state is INIT:
        state = SYN_SENT if sent else SYN_RECEIVED
    if flags & FLAG_ACK and state is (SYN_RECEIVED if sent else SYN_SENT):
        state = ESTABLISHED
    if flags & FLAG_FIN:
        if state in _OPEN:
            state = LOCAL_CLOSE if sent else REMOTE_CLOSE
        elif state is (REMOTE_CLOSE if sent else LOCAL_CLOSE):
            state = CLOSED
    return state


def _bytes_view(data):
    """True for a flat memoryview of a bytes object: it can be kept as it is."""
    return (type(data) is memoryview and type(data.obj) is bytes
            and data.ndim == 1 and data.itemsize == 1)


@implementer(ITransport, IConsumer, IPushProducer)
class YamuxStream:
    """A yamux stream; the protocol connected to it sees an ordinary transport.

    ``dataReceived`` gets bytes.  A protocol that reads its data without
    keeping it as bytes may set ``transport.deliver_views = True``: pieces of
    a read that carried more than this stream's data then come as memoryviews
    into that read instead of copies (writing them to a stream needs no copy).
    """

    _log = Logger()

    def __init__(self, session, stream_id):
        config = session.config
        self.session = session
        self._sender = session.sender
        self.stream_id = stream_id
        self.state = INIT
        self.protocol = None
        self.connected = False
        self.disconnecting = False  # loseConnection called (or the stream ended)
        self.disconnected = False  # connectionLost delivered
        self.producer = None
        self.deliver_views = False
        self._streaming = True
        self._producer_paused = False
        self._high_water = config.max_stream_send_buffer
        # Send side: the peer's window, our buffer, whether a FIN is to follow it.
        self._send_window = INITIAL_STREAM_WINDOW
        self._send_buf = deque()
        self._send_head = 0  # bytes of _send_buf[0] already sent
        self._send_len = 0
        self._write_closed = False
        # Receive side: what the peer may still send, credit not yet granted.
        self._recv_max = config.max_stream_window_size
        self._recv_window = INITIAL_STREAM_WINDOW
        self._credit = 0
        self._recv_buf = bytearray()  # one buffer: tiny frames cost no per-chunk overhead
        self._reading_paused = False
        self._draining = False
        self._read_closed = False  # the end of reading was delivered (or dropped)
        self._open_timer = None
        self._close_timer = None

    def __repr__(self):
        return f"<YamuxStream {self.stream_id} {self.state.name} of {self.session!r}>"

    @property
    def established(self):
        """True once the peer acknowledged the stream (or opened it)."""
        return self.state > SYN_SENT and self.state != SYN_RECEIVED

    @property
    def send_window(self):
        """Bytes the peer's window lets this stream send now."""
        return self._send_window

    @property
    def receive_window(self):
        """Bytes the peer may still send before our next window update."""
        return self._recv_window

    @property
    def send_buffered(self):
        """Bytes written and not yet sent."""
        return self._send_len

    @property
    def receive_buffered(self):
        """Bytes received and not yet delivered (the protocol is paused)."""
        return len(self._recv_buf)

    # The session's side: YamuxSession and its Sender drive the stream through
    # move, open_frame, await_ack, attach, receive_header, receive_data,
    # receive_fin, send_turn and finish; a protocol uses the transport methods.

    def move(self, flags, sent):
        """Move the state for a frame with ``flags`` sent (``sent``) or received."""
        self.state = transition(self.state, flags, sent)

    def await_ack(self, timeout, timed_out):
        """Call ``timed_out(stream)`` unless the peer's ACK comes within ``timeout``."""
        self._open_timer = self.session.clock.callLater(timeout, self._ack_timed_out, timed_out)

    def _ack_timed_out(self, timed_out):
        self._open_timer = None
        timed_out(self)

    # -- ITransport / IConsumer --------------------------------------------

    def write(self, data):
        """Buffer ``data`` for sending; dropped once the write side is closed.

        Bytes, and memoryviews of bytes (immutable, so kept without a copy).
        """
        if self._write_closed or self.disconnected or not data:
            return
        if type(data) is not bytes and not _bytes_view(data):
            data = bytes(data)  # a copy: the caller may change a bytearray later
        self._send_buf.append(data)
        self._send_len += len(data)
        if self._send_window > 0:
            self._sender.schedule(self)
        if self.producer is not None:
            self._check_producer()

    def writeSequence(self, data):
        """Write every item of ``data`` (no joining copy: items are sent as they are)."""
        for item in data:
            self.write(item)

    def loseWriteConnection(self):
        """Half-close: send FIN after the buffered data; reading goes on."""
        if self.disconnected or self._write_closed:
            return
        self._write_closed = True
        self._sender.schedule(self)

    def loseConnection(self):
        """FIN after the buffered data; connectionLost once the peer's FIN arrived."""
        if self.disconnected or self.disconnecting:
            return
        self.disconnecting = True
        # Nothing more is delivered; whatever arrives is still credited so the
        # peer can finish and send its FIN.
        buffered = len(self._recv_buf)
        self._recv_buf.clear()
        if self.state in _FIN_RECEIVED:
            self._read_closed = True
        if buffered:
            self._add_credit(buffered)
        if self.state in _FIN_SENT:
            self._after_fin_sent()
        else:
            self.loseWriteConnection()

    def abortConnection(self):
        """Reset the stream now (RST); connectionLost(ConnectionAborted)."""
        if self.disconnected:
            return
        self._send_rst()
        self.finish(error.ConnectionAborted())

    def getPeer(self):
        return StreamAddress(self.session.peer_address(), self.stream_id)

    def getHost(self):
        return StreamAddress(self.session.host_address(), self.stream_id)

    def registerProducer(self, producer, streaming):
        if self.producer is not None:
            raise RuntimeError(f"producer {self.producer!r} already registered")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if streaming:
            self._check_producer()
        elif not self._should_pause():
            producer.resumeProducing()

    def unregisterProducer(self):
        self.producer = None
        self._producer_paused = False

    # -- IPushProducer (inbound data) --------------------------------------

    def pauseProducing(self):
        """Stop delivering received data; it is buffered (at most one window)."""
        self._reading_paused = True

    def resumeProducing(self):
        """Deliver what was buffered and go on delivering."""
        self._reading_paused = False
        if not self._draining:
            self._drain()

    def stopProducing(self):
        self.loseConnection()

    # -- outbound flow control ---------------------------------------------

    def _should_pause(self):
        # Paused while the peer's window cannot take more than what is buffered.
        return self._send_window <= self._send_len or self._send_len >= self._high_water

    def _check_producer(self):
        producer = self.producer
        if self._should_pause():
            if self._streaming and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()
        elif self._streaming:
            if self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
        elif not self._send_len:
            producer.resumeProducing()

    def _can_send(self):
        if self._send_len:
            return self._send_window > 0
        return self._write_closed and self.state not in _FIN_SENT

    # -- the send window: granted by the peer's updates, spent by _send_turn ---

    def _window_update(self, delta):
        window = self._send_window + delta
        if window > MAX_STREAM_WINDOW:
            raise ProtocolError(
                f"stream {self.stream_id}: window update of {delta} takes the send window "
                f"past {MAX_STREAM_WINDOW} bytes")
        self._send_window = window
        if self._can_send():
            self._sender.schedule(self)
        if self.producer is not None:
            self._check_producer()

    def send_turn(self, limit, out):
        """Append one frame of at most ``limit`` body bytes (and a due FIN) to ``out``.

        Returns (bytes appended, body bytes, whether more can go).  The body goes
        into ``out`` as the buffered writes themselves or memoryviews into them,
        never as copies: the sender joins ``out`` into one transport write, the
        only copy made of the body before the socket.
        """
        written = 0
        size = min(limit, self._send_window, self._send_len)
        if size > 0:
            out.append(encode_header(TYPE_DATA, 0, self.stream_id, size))
            buf = self._send_buf
            head = self._send_head
            left = size
            while left:
                chunk = buf[0]
                available = len(chunk) - head
                if available <= left:
                    buf.popleft()
                    out.append(memoryview(chunk)[head:] if head else chunk)
                    left -= available
                    head = 0
                else:
                    out.append(memoryview(chunk)[head:head + left])
                    head += left
                    left = 0
            self._send_head = head
            self._send_len -= size
            self._send_window -= size
            written = size + HEADER_SIZE
        else:
            size = 0
        if self._write_closed and not self._send_len and self.state not in _FIN_SENT:
            # FIN travels on its own WINDOW_UPDATE, as Go sends it: some hashicorp/yamux
            # versions let a reader see the FIN of a DATA|FIN frame before its body and
            # report EOF with the last bytes unread.
            self.move(FLAG_FIN, True)
            out.append(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, self.stream_id, 0))
            written += HEADER_SIZE
            self._after_fin_sent()
        if self.producer is not None and not self.disconnected:
            self._check_producer()
        return written, size, not self.disconnected and self._can_send()

    def _after_fin_sent(self):
        if self._read_closed:
            self.finish(error.ConnectionDone())
        elif self.disconnecting:
            if self._close_timer is None:
                self._close_timer = self.session.clock.callLater(
                    self.session.config.stream_close_timeout, self._close_timed_out
                )
        else:
            half = IHalfCloseableProtocol(self.protocol, None)
            if half is not None:
                half.writeConnectionLost()

    def _close_timed_out(self):
        self._close_timer = None
        self._log.info("stream {stream_id}: no FIN from the peer after close, resetting",
                       stream_id=self.stream_id)
        self._send_rst()
        self.finish(StreamReset("no FIN from the peer within stream_close_timeout"))

    # -- inbound -----------------------------------------------------------

    def receive_header(self, header):
        """Apply a frame's flags and window; True if its DATA body is to be read.

        Called by the session for every frame of this stream (SYN already
        handled); a FIN on a DATA frame with a body waits for the body's end.
        """
        flags = header.flags
        if flags & FLAG_ACK:
            self._remote_ack()
        if flags & FLAG_RST:
            self._remote_rst()
            return False
        if header.type == TYPE_WINDOW_UPDATE:
            self._window_update(header.length)
        elif header.length:
            self._spend_recv_window(header.length)
            return True
        if flags & FLAG_FIN and not self.disconnected:
            self.receive_fin()
        return False

    # -- the receive window: spent by the peer's DATA, credited for delivered bytes

    def open_frame(self, flag):
        """The SYN or ACK window update, advertising any window above 256 KiB."""
        self.move(flag, True)
        delta = self._recv_max - INITIAL_STREAM_WINDOW
        self._recv_window += delta
        return encode_header(TYPE_WINDOW_UPDATE, flag, self.stream_id, delta)

    def _spend_recv_window(self, length):
        if length > self._recv_window:
            raise ProtocolError(
                f"stream {self.stream_id}: {length} bytes exceed the receive window "
                f"({self._recv_window} left)"
            )
        self._recv_window -= length

    def receive_data(self, chunk):
        """A piece of a DATA body whose length ``receive_header`` accepted."""
        if self.state in _FIN_RECEIVED:
            return  # the peer broke its own FIN; nothing more is read (no credit needed)
        if self.disconnecting:
            self._add_credit(len(chunk))
        elif self._reading_paused or self._recv_buf:
            self._recv_buf += chunk
        elif type(chunk) is bytes or self.deliver_views:
            self._deliver(chunk)
        else:
            self._deliver(bytes(chunk))

    def _deliver(self, chunk):
        try:
            self.protocol.dataReceived(chunk)
        except Exception:
            self._log.failure("stream {stream_id}: protocol.dataReceived failed",
                              stream_id=self.stream_id)
            self.abortConnection()
            return
        self._add_credit(len(chunk))

    def _add_credit(self, count):
        credit = self._credit + count
        if (credit >= self._recv_max >> 1 and self.state not in _FIN_RECEIVED
                and not self.disconnected):
            self._credit = 0
            self._recv_window += credit
            self._sender.send_control(encode_header(TYPE_WINDOW_UPDATE, 0, self.stream_id, credit))
        else:
            self._credit = credit

    def _drain(self):
        self._draining = True
        try:
            buf = self._recv_buf
            while buf and not self._reading_paused and not self.disconnected:
                data = bytes(buf)
                buf.clear()
                self._deliver(data)
        finally:
            self._draining = False
        if not self._recv_buf and self.state in _FIN_RECEIVED and not self._read_closed:
            self._deliver_read_closed()

    def receive_fin(self):
        """The peer's FIN arrived (after the body of its frame, if any)."""
        before = self.state
        self.move(FLAG_FIN, False)
        if self.state is before:
            return  # a repeated FIN
        if self.disconnecting:
            self._read_closed = True
            if self.state is CLOSED:
                self.finish(error.ConnectionDone())
        elif not self._recv_buf:
            self._deliver_read_closed()

    def _deliver_read_closed(self):
        self._read_closed = True
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.readConnectionLost()
            if self.state in _FIN_SENT and not self.disconnected:
                self.finish(error.ConnectionDone())
        elif self.state in _FIN_SENT:
            self.finish(error.ConnectionDone())
        else:
            self.loseConnection()

    def _remote_ack(self):
        self.move(FLAG_ACK, False)
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None

    def _remote_rst(self):
        self.move(FLAG_RST, False)
        self.finish(StreamReset(f"stream {self.stream_id} reset by the peer"))

    def _send_rst(self):
        self.move(FLAG_RST, True)
        self._sender.send_control(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, self.stream_id, 0))

    # -- lifecycle ---------------------------------------------------------

    def attach(self, protocol):
        """Connect ``protocol`` to this stream (its makeConnection)."""
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)

    def finish(self, reason):
        """Close for good: leave the session's table, tell the protocol once."""
        if self.disconnected:
            return
        if self.state is not RESET:
            self.state = CLOSED  # both FINs, or the session ended under the stream
        self.disconnected = True
        self.connected = False
        self.disconnecting = True
        for timer in (self._open_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._open_timer = self._close_timer = None
        self._send_buf.clear()
        self._send_head = 0
        self._send_len = 0
        self._recv_buf.clear()
        self.session.stream_finished(self)
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(Failure(reason))
            except Exception:
                self._log.failure("stream {stream_id}: protocol.connectionLost failed",
                                  stream_id=self.stream_id)
