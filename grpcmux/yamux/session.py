"""YamuxSession: a yamux session as a Twisted protocol, and its factory.

The session parses frames, keeps the stream table, hands peer-opened streams
to ``stream_factory``, answers pings and handles GoAway; its ``Sender``
(``sender.py``) writes control frames first, then DATA round-robin across
streams.  It registers itself as its transport's producer and sends no DATA
while the transport has paused it.
"""

from twisted.internet import defer, error
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
    MAX_STREAM_ID,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameParser,
    encode_header,
)
from grpcmux.writes import batched

from .sender import Sender
from .stream import YamuxStream


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
    ``go_away_received``, ``go_away_sent``, ``clock``, ``sender``, ``parser``;
    ``next_stream_id``, the id the next stream opened here gets.

    ``tune_transport``, if given, is called with the transport in
    ``connectionMade``: socket tuning belongs to the application (see
    ``grpcmux.tuning``), not to the protocol.
    """

    _log = Logger()

    def __init__(self, is_client, stream_factory=None, config=None, clock=None,
                 tune_transport=None):
        self.is_client = bool(is_client)
        self.stream_factory = stream_factory
        self.config = config if config is not None else YamuxConfig()
        self._clock = clock
        self.streams = {}
        self.closed = False
        self.go_away_received = False
        self.go_away_sent = False
        self._tune_transport = tune_transport
        self.next_stream_id = 1 if self.is_client else 2
        self.parser = FrameParser(self)
        self.sender = Sender(self, self._control_written)
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
        if self._tune_transport is not None:
            self._tune_transport(self.transport)
        if self.config.enable_keepalive:
            self._schedule_keepalive()

    @batched
    def dataReceived(self, data):
        self.bytes_received += len(data)
        if self.closed:
            return
        sender = self.sender
        sender.receiving = True
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            sender.receiving = False
            self._log.warn("yamux protocol error from {peer}: {error}",
                           peer=self.peer_address(), error=exc)
            self._fail(exc, GO_AWAY_PROTOCOL_ERROR)
            return
        except Exception as exc:
            sender.receiving = False
            self._log.failure("yamux session failed while receiving")
            self._fail(exc, GO_AWAY_INTERNAL_ERROR)
            return
        sender.receiving = False
        if not self.closed:
            sender.flush()

    def connectionLost(self, reason=None):
        if not self.closed:
            value = reason.value if reason is not None else error.ConnectionDone()
            self._shutdown(value, lose_transport=False)

    # -- public API --------------------------------------------------------

    def open_stream(self, protocol):
        """Open a stream (SYN) and connect ``protocol`` to it; data may be written at once."""
        self.check_can_open()
        stream_id = self.next_stream_id
        self.next_stream_id = stream_id + 2
        stream = YamuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self.sender.send_control(stream.open_frame(FLAG_SYN))
        stream.await_ack(self.config.stream_open_timeout, self._open_timed_out)
        stream.attach(protocol)
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
        self.sender.send_control(encode_header(TYPE_PING, FLAG_SYN, 0, ping_id))
        return result

    def go_away(self, code=GO_AWAY_NORMAL):
        """Tell the peer that no new streams will be accepted; existing ones go on."""
        if self.closed:
            return
        self.go_away_sent = True
        self.sender.send_control(encode_header(TYPE_GO_AWAY, 0, 0, code))

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
        self.sender.pause()

    def resumeProducing(self):
        self.sender.resume()

    def stopProducing(self):
        self.sender.pause()

    # -- frame handler (called by FrameParser) -----------------------------

    def frame_received(self, header):
        ftype = header.type
        if ftype <= TYPE_WINDOW_UPDATE:
            return self._stream_frame(header)
        if ftype == TYPE_PING:
            if header.flags & FLAG_SYN:
                self.sender.send_control(encode_header(TYPE_PING, FLAG_ACK, 0, header.length))
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
                           peer=self.peer_address(), code=code)
            self._shutdown(RemoteGoAwayError(f"peer sent GoAway({code})"), lose_transport=True)
        return False

    def data_received(self, header, chunk, last):
        stream = self.streams.get(header.stream_id)
        if stream is None:
            return
        stream.receive_data(chunk)
        if last and header.flags & FLAG_FIN and not stream.disconnected:
            stream.receive_fin()

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
        return stream.receive_header(header)

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
                               "resetting the extra ones", peer=self.peer_address(),
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
                    StreamAddress(self.peer_address(), stream_id))
            except Exception:
                self._log.failure("stream factory failed for stream {stream_id}",
                                  stream_id=stream_id)
        if protocol is None:
            self._send_rst(stream_id)
            return None
        stream = YamuxStream(self, stream_id)
        stream.move(FLAG_SYN, sent=False)
        self.streams[stream_id] = stream
        self._unacked_incoming += 1
        self.sender.send_control(stream.open_frame(FLAG_ACK))
        try:
            stream.attach(protocol)
        except Exception:
            self._log.failure("stream {stream_id}: makeConnection failed", stream_id=stream_id)
            stream.abortConnection()
        if stream.disconnected:
            return None
        return stream

    # -- sending -----------------------------------------------------------

    def _send_rst(self, stream_id):
        """Refuse a stream the peer opened (no YamuxStream was made for it)."""
        self.sender.send_control(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    def _control_written(self):
        # The ACKs queued so far are on their way: the accept backlog starts over.
        self._unacked_incoming = 0

    # -- streams -----------------------------------------------------------

    def check_can_open(self):
        """Raise what ``open_stream`` would raise now, if anything."""
        if self.closed or self.transport is None:
            raise SessionClosed("session closed")
        if self.go_away_received:
            raise GoAwayReceived("peer sent GoAway: no new streams")
        if self.go_away_sent:
            raise GoAwaySent("GoAway sent: no new streams")
        if len(self.streams) >= self.config.max_streams:
            raise StreamLimitReached(
                f"{len(self.streams)} streams are open, the session's limit (max_streams)")
        if self.next_stream_id >= MAX_STREAM_ID - 1:
            raise StreamIdsExhausted("no stream ids left in this session")

    def stream_finished(self, stream):
        """``stream`` ended: it leaves the table (called by the stream)."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    def _open_timed_out(self, stream):
        self._log.warn("stream {stream_id} not acknowledged in time, closing the session",
                       stream_id=stream.stream_id)
        self._shutdown(StreamOpenTimeout(f"stream {stream.stream_id} was not acknowledged"),
                       lose_transport=True)

    def peer_address(self):
        """The transport's peer address (None without a transport)."""
        return self.transport.getPeer() if self.transport is not None else None

    def host_address(self):
        """The transport's host address (None without a transport)."""
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
                           peer=self.peer_address())
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
        self.sender.stop(write=self.transport is not None and not abort)
        self.closed = True
        self._close_reason = reason
        self.parser.stop()
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        stream_reason = SessionClosed(f"session closed: {reason}" if reason else "session closed")
        for stream in list(self.streams.values()):
            stream.finish(stream_reason)
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

    def __init__(self, is_client, stream_factory=None, config=None, clock=None,
                 tune_transport=None):
        self.is_client = is_client
        self.stream_factory = stream_factory
        self.config = config
        self.clock = clock
        self.tune_transport = tune_transport

    def buildProtocol(self, addr):
        session = YamuxSession(self.is_client, self.stream_factory, self.config, self.clock,
                               self.tune_transport)
        session.factory = self
        return session

