"""The two wire handshakes a multiplexer client can speak.

Legacy (the Go grpc-multiplexer v0.2.1): the client opens one stream, writes
``<client-id>\\n`` and then both ends run a *nested* yamux session on that stream, the
client as its server.  There is no answer: a refused client is simply disconnected.

Native (ours): the client's first stream is a control stream.  It starts with
``MAGIC`` (a NUL byte first, which no legacy id line can start with) followed by
length-prefixed protobuf messages: ``Hello`` from the client, then ``Welcome`` or
``Reject`` from the server.  Data streams are opened by the server on the outer session.

The server tells the two apart from the first byte of the first stream.
"""

import struct
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.preface import WrongEndpoint

MAGIC = b"\x00GRPCMUX\x01"
WIRE_NATIVE = "native"
WIRE_LEGACY = "legacy"

#: Upper bound of one handshake message; a Hello with labels and a token is far smaller.
MAX_MESSAGE_SIZE = 64 * 1024
#: Upper bound of a legacy id line: 128 characters of at most 4 UTF-8 bytes, newline.
MAX_ID_LINE = 4 * 128 + 1

_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class ClientHello:
    """What a client says about itself, whichever handshake carried it."""

    client_id: str
    wire_protocol: str
    labels: tuple = ()
    token: str = field(default="", repr=False)  # a secret: never in logs
    version: str = ""


class HandshakeRejected(Exception):
    """The server refused the client and said why."""

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{tunnel_pb2.Reject.Code.Name(self.code)}: {self.message}"


class HandshakeFailed(Exception):
    """The handshake broke down: bad bytes, an early close or no answer in time."""


LEGACY_HINT = (
    "the server may be a legacy grpc-multiplexer; if so, use --wire-protocol legacy"
)


def encode_message(message):
    """Frame one protobuf message: 4-byte big-endian length, then the message."""
    body = message.SerializeToString()
    return _LENGTH.pack(len(body)) + body


class MessageReader:
    """Split a byte stream into length-prefixed messages, refusing oversized ones."""

    def __init__(self, max_size=MAX_MESSAGE_SIZE):
        self._max_size = max_size
        self._buffer = bytearray()

    @property
    def buffered(self):
        """Bytes of an incomplete message kept until the rest of it is fed."""
        return len(self._buffer)

    def feed(self, data):
        """Add bytes; return the complete message bodies now available."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self._max_size:
                self._buffer.clear()  # nothing past the cap is kept
                raise HandshakeFailed(
                    f"a handshake message of {size} bytes exceeds the limit of "
                    f"{self._max_size}"
                )
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                break
            messages.append(bytes(self._buffer[_LENGTH.size:end]))
            del self._buffer[:end]
        return messages


@implementer(IHalfCloseableProtocol)
class _Preamble(Protocol):
    """Reads a preamble on a stream, then hands the stream to an inner protocol.

    The legacy handshake runs a whole yamux session after the id line; instead of
    swapping protocols under the transport, this protocol stays in place and
    forwards everything to the inner one.
    """

    inner = None

    def dataReceived(self, data):
        if self.inner is None:
            self.preamble_received(data)
        else:
            self.inner.dataReceived(data)

    def hand_over(self, inner, leftover=b""):
        self.inner = inner
        inner.makeConnection(self.transport)
        if leftover:
            inner.dataReceived(leftover)

    def preamble_received(self, data):
        raise NotImplementedError

    def preamble_lost(self, reason):
        """The stream ended before the preamble was through."""

    def readConnectionLost(self):
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()

    def connectionLost(self, reason=None):
        if self.inner is None:
            self.preamble_lost(reason)
        else:
            self.inner.connectionLost(reason)


class ServerHandshake(_Preamble):
    """The server's side of a client's first stream, for either wire protocol.

    Calls ``on_hello(handshake, hello)`` once with the client's ``ClientHello`` (or
    ``on_failure(handshake, reason)`` for bytes that are neither handshake), after
    which the owner calls ``accept`` or ``reject``.  Once a native client is
    accepted, each ``ClientMessage`` it sends goes to ``on_message(message)``.

    Nothing beyond the caps is kept: at most ``MAX_ID_LINE`` bytes of an id line,
    the magic plus one message of at most ``MAX_MESSAGE_SIZE`` (refused on its
    announced length), and ``MAX_MESSAGE_SIZE`` of a legacy client's early frames.
    """

    _log = Logger()

    def __init__(self, on_hello, on_failure, make_inner_session, on_message=None):
        self._on_hello = on_hello
        self._on_failure = on_failure
        self._make_inner_session = make_inner_session
        self._on_message = on_message
        self._buffer = bytearray()
        self._reader = MessageReader()
        self.wire_protocol = None
        self._done = False
        self._accepted = False
        self._after_reject = None

    @property
    def preamble_buffered(self):
        """Bytes of an id line, of the magic or of a legacy client's early frames
        kept between reads (at most the caps above; none once accepted)."""
        return len(self._buffer or b"")

    @property
    def message_buffered(self):
        """Bytes of an incomplete native handshake message kept between reads."""
        return self._reader.buffered

    def preamble_received(self, data):
        if self._accepted and self.wire_protocol == WIRE_NATIVE:
            self._control_received(data)
            return
        if self._done:
            self._hold(data)
            return
        if not data:
            return
        if self.wire_protocol is None:
            self.wire_protocol = WIRE_NATIVE if data[0] == 0 else WIRE_LEGACY
        parse = self._parse_id_line if self.wire_protocol == WIRE_LEGACY else self._parse_hello
        try:
            hello = parse(data)
        except HandshakeFailed as failure:
            self._fail(str(failure))
            return
        if hello is not None:
            self._done = True
            self._on_hello(self, hello)

    def _parse_id_line(self, data):
        room = MAX_ID_LINE - len(self._buffer)
        end = data.find(b"\n", 0, room)
        if end < 0:
            if len(data) >= room:
                raise HandshakeFailed(
                    f"legacy id line longer than {MAX_ID_LINE} bytes without a newline"
                )
            self._buffer += data
            return None
        raw = bytes(self._buffer) + data[:end]
        self._buffer = bytearray()
        try:
            client_id = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HandshakeFailed("legacy id line is not valid UTF-8") from None
        self._hold(data[end + 1:])  # the client's nested session may have started
        return ClientHello(client_id=client_id, wire_protocol=WIRE_LEGACY)

    def _parse_hello(self, data):
        missing = len(MAGIC) - len(self._buffer)
        if missing > 0:
            self._buffer += data[:missing]
            data = data[missing:]
            if not MAGIC.startswith(bytes(self._buffer)):
                raise HandshakeFailed("control stream does not start with the grpcmux magic")
        messages = self._reader.feed(data) if data else []
        if not messages:
            return None
        message = tunnel_pb2.Hello()
        try:
            message.ParseFromString(messages[0])
        except Exception:
            raise HandshakeFailed("Hello is not a valid protobuf message") from None
        return ClientHello(
            client_id=message.client_id,
            wire_protocol=WIRE_NATIVE,
            labels=tuple(sorted(message.labels.items())),
            token=message.token,
            version=message.version,
        )

    def _control_received(self, data):
        """An admitted native client's later messages (its backend's health)."""
        try:
            bodies = self._reader.feed(data)
        except HandshakeFailed as failure:
            self._on_failure(self, f"control stream: {failure}")
            return
        for body in bodies:
            message = tunnel_pb2.ClientMessage()
            try:
                message.ParseFromString(body)
            except Exception:
                self._on_failure(self, "control stream: a message is not valid protobuf")
                return
            if self._on_message is not None:
                self._on_message(message)

    def _hold(self, data):
        """Keep what a legacy client's nested session sends while we decide on it."""
        if self.wire_protocol != WIRE_LEGACY or self.inner is not None or not data:
            return
        if len(self._buffer) + len(data) > MAX_MESSAGE_SIZE:
            self._fail("the client sent too much before it was admitted")
            return
        self._buffer += data

    def _fail(self, reason):
        self._done = True
        self.wire_protocol = None
        self._on_failure(self, reason)

    def accept(self, welcome):
        """Admit the client; return the function that opens data streams to it."""
        if self.wire_protocol == WIRE_NATIVE:
            self.transport.write(encode_message(tunnel_pb2.ServerMessage(welcome=welcome)))
            self._accepted = True
            return None
        inner = self._make_inner_session()
        leftover, self._buffer = bytes(self._buffer), None
        self.hand_over(inner, leftover)
        return inner

    def reject(self, code, message, then):
        """Refuse the client; a native one is told why, a legacy one just dropped.

        ``then()`` is called once the refusal has been written out, so the owner can
        close the session without cutting the Reject off.
        """
        if self.wire_protocol != WIRE_NATIVE:
            then()
            return
        reject = tunnel_pb2.Reject(code=code, message=message)
        self.transport.write(encode_message(tunnel_pb2.ServerMessage(reject=reject)))
        self._after_reject = then
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        then, self._after_reject = self._after_reject, None
        if then is not None:
            then()
        else:
            super().writeConnectionLost()

    def preamble_lost(self, reason):
        if not self._done:
            self._fail("the client closed its first stream before the handshake")


class NativeClientHandshake(Protocol):
    """The client's control stream: sends Hello, waits for Welcome or Reject.

    ``result`` fires with the ``Welcome`` or fails with ``HandshakeRejected`` or
    ``HandshakeFailed``.  The stream then stays open for the session's lifetime,
    and carries ``ClientMessage``s (``report_backend_health``).
    """

    def __init__(self, hello):
        self._hello = hello
        self._reader = MessageReader()
        self.result = Deferred()
        self.welcomed = False

    def report_backend_health(self, status, detail=""):
        """Tell the server how the gRPC server is (a ``BackendHealth.Status``).

        Only after the Welcome; servers that predate the message ignore it.
        """
        if not self.welcomed:
            return
        health = tunnel_pb2.BackendHealth(status=status, detail=detail)
        self.transport.write(encode_message(tunnel_pb2.ClientMessage(backend_health=health)))

    def connectionMade(self):
        hello = tunnel_pb2.Hello(
            client_id=self._hello.client_id,
            token=self._hello.token,
            version=self._hello.version,
            labels=dict(self._hello.labels),
        )
        self.transport.write(MAGIC + encode_message(hello))

    def dataReceived(self, data):
        if self.result.called:
            return
        try:
            messages = self._reader.feed(data)
        except HandshakeFailed as failure:
            self._finish(HandshakeFailed(f"{failure}; {LEGACY_HINT}"))
            return
        if not messages:
            return
        answer = tunnel_pb2.ServerMessage()
        try:
            answer.ParseFromString(messages[0])
        except Exception:
            self._finish(HandshakeFailed(f"the server's answer is not a grpcmux message; {LEGACY_HINT}"))
            return
        kind = answer.WhichOneof("kind")
        if kind == "welcome":
            self.welcomed = True
            self.result.callback(answer.welcome)
        elif kind == "reject":
            self._finish(HandshakeRejected(answer.reject.code, answer.reject.message))
        else:
            self._finish(HandshakeFailed(f"the server answered neither Welcome nor Reject; {LEGACY_HINT}"))

    def timed_out(self, seconds):
        self._finish(HandshakeFailed(f"no Welcome within {seconds:g} s; {LEGACY_HINT}"))

    def _finish(self, error):
        if not self.result.called:
            self.result.errback(error)

    def connectionLost(self, reason=None):
        why = _wrong_endpoint(self.transport)
        self._finish(HandshakeFailed(
            why or f"the server closed the control stream without a Welcome; {LEGACY_HINT}"))


def _wrong_endpoint(stream):
    """What :class:`grpcmux.preface.PrefaceGuard` found, if it closed *stream*'s session."""
    session = getattr(stream, "session", None)
    if session is None or not session.closed:
        return None
    reason = []
    session.when_closed().addBoth(reason.append)  # fired already: the session is closed
    value = getattr(reason[0], "value", reason[0]) if reason else None
    return str(value) if isinstance(value, WrongEndpoint) else None


class LegacyClientHandshake(_Preamble):
    """The client's side of the legacy handshake: the id line, then a nested session."""

    def __init__(self, client_id, inner_session):
        self._client_id = client_id
        self._inner_session = inner_session

    def connectionMade(self):
        self.transport.write(self._client_id.encode("utf-8") + b"\n")
        self.hand_over(self._inner_session)
