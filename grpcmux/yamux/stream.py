"""YamuxStream: one yamux stream as a Twisted transport.

Outbound bytes are buffered per stream and sent by the session's round-robin
scheduler within the peer's window; the registered producer is paused while
the window is spent or the buffer is above its high-water mark.  Inbound bytes
are delivered while the stream is producing and buffered (at most one window)
while it is paused; the receive window is credited only for bytes delivered.
"""

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
from .errors import StreamReset
from .frame import (
    FLAG_FIN,
    HEADER_SIZE,
    INITIAL_STREAM_WINDOW,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    encode_header,
)


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
        self.stream_id = stream_id
        self.protocol = None
        self.connected = False
        self.disconnecting = False
        self.disconnected = False
        self.established = False
        self.producer = None
        self.deliver_views = False
        self._streaming = True
        self._producer_paused = False
        self._high_water = config.max_stream_send_buffer
        # Send side: the peer's window, our buffer, FIN state.
        self._send_window = INITIAL_STREAM_WINDOW
        self._send_buf = deque()
        self._send_head = 0  # bytes of _send_buf[0] already sent
        self._send_len = 0
        self._write_closed = False
        self._fin_sent = False
        self._close_requested = False
        self._scheduled = False
        # Receive side: what the peer may still send, credit not yet granted.
        self._recv_max = config.max_stream_window_size
        self._recv_window = INITIAL_STREAM_WINDOW
        self._credit = 0
        self._recv_buf = bytearray()  # one buffer: tiny frames cost no per-chunk overhead
        self._reading_paused = False
        self._draining = False
        self._fin_received = False
        self._read_closed = False
        self._open_timer = None
        self._close_timer = None

    def __repr__(self):
        return f"<YamuxStream {self.stream_id} of {self.session!r}>"

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
            self.session._schedule(self)
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
        self.session._schedule(self)

    def loseConnection(self):
        """FIN after the buffered data; connectionLost once the peer's FIN arrived."""
        if self.disconnected or self.disconnecting:
            return
        self.disconnecting = True
        self._close_requested = True
        # Nothing more is delivered; whatever arrives is still credited so the
        # peer can finish and send its FIN.
        buffered = len(self._recv_buf)
        self._recv_buf.clear()
        if self._fin_received:
            self._read_closed = True
        if buffered:
            self._add_credit(buffered)
        if self._fin_sent:
            self._after_fin_sent()
        else:
            self.loseWriteConnection()

    def abortConnection(self):
        """Reset the stream now (RST); connectionLost(ConnectionAborted)."""
        if self.disconnected:
            return
        self.session._send_rst(self.stream_id)
        self._finish(error.ConnectionAborted())

    def getPeer(self):
        return StreamAddress(self.session._peer_address(), self.stream_id)

    def getHost(self):
        return StreamAddress(self.session._host_address(), self.stream_id)

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
        return self._write_closed and not self._fin_sent

    def _window_update(self, delta):
        self._send_window += delta
        if self._can_send():
            self.session._schedule(self)
        if self.producer is not None:
            self._check_producer()

    def _send_turn(self, limit, out):
        """Append one frame of at most ``limit`` body bytes to ``out``; True if more can go.

        The body goes into ``out`` as the buffered writes themselves or memoryviews
        into them, never as copies: the session joins ``out`` into one transport
        write, the only copy made of the body before the socket.
        """
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
            self.session.bytes_sent += size + HEADER_SIZE
        fin = self._write_closed and not self._fin_sent and not self._send_len
        if fin:
            # FIN travels on its own WINDOW_UPDATE, as Go sends it: some hashicorp/yamux
            # versions let a reader see the FIN of a DATA|FIN frame before its body and
            # report EOF with the last bytes unread.
            self._fin_sent = True
            out.append(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, self.stream_id, 0))
            self.session.bytes_sent += HEADER_SIZE
            self._after_fin_sent()
        if self.producer is not None and not self.disconnected:
            self._check_producer()
        return not self.disconnected and self._can_send()

    def _after_fin_sent(self):
        if self._read_closed:
            self._finish(error.ConnectionDone())
        elif self._close_requested:
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
        self.session._send_rst(self.stream_id)
        self._finish(StreamReset("no FIN from the peer within stream_close_timeout"))

    # -- inbound -----------------------------------------------------------

    def _data_received(self, chunk):
        if self._fin_received:
            return  # the peer broke its own FIN; nothing more is read (no credit needed)
        if self._close_requested:
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
        if credit >= self._recv_max >> 1 and not self._fin_received and not self.disconnected:
            self._credit = 0
            self._recv_window += credit
            self.session._send_control(encode_header(TYPE_WINDOW_UPDATE, 0, self.stream_id, credit))
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
        if not self._recv_buf and self._fin_received and not self._read_closed:
            self._deliver_read_closed()

    def _remote_fin(self):
        if self._fin_received:
            return
        self._fin_received = True
        if self._close_requested:
            self._read_closed = True
            if self._fin_sent:
                self._finish(error.ConnectionDone())
        elif not self._recv_buf:
            self._deliver_read_closed()

    def _deliver_read_closed(self):
        self._read_closed = True
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            half.readConnectionLost()
            if self._fin_sent and not self.disconnected:
                self._finish(error.ConnectionDone())
        elif self._fin_sent:
            self._finish(error.ConnectionDone())
        else:
            self.loseConnection()

    def _remote_ack(self):
        self.established = True
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None

    def _remote_rst(self):
        self._finish(StreamReset(f"stream {self.stream_id} reset by the peer"))

    # -- lifecycle ---------------------------------------------------------

    def _attach(self, protocol):
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)

    def _finish(self, reason):
        """Close for good: leave the session's table, tell the protocol once."""
        if self.disconnected:
            return
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
        self.session._stream_finished(self)
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(Failure(reason))
            except Exception:
                self._log.failure("stream {stream_id}: protocol.connectionLost failed",
                                  stream_id=self.stream_id)
