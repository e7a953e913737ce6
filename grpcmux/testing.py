"""Public test helpers: build and read yamux frames, connect two sessions in memory."""

from typing import NamedTuple

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from grpcmux.yamux import frame as _f
from grpcmux.yamux.session import YamuxSession


class Frame(NamedTuple):
    """One frame as read back from the wire: header fields plus the DATA body."""

    type: int
    flags: int
    stream_id: int
    length: int
    data: bytes = b""
    version: int = _f.VERSION


def build_frame(type, flags=0, stream_id=0, length=None, data=b"", version=_f.VERSION):
    """Return the bytes of one frame; ``length`` defaults to ``len(data)``."""
    if length is None:
        length = len(data)
    header = bytearray(_f.encode_header(type, flags, stream_id, length))
    header[0] = version
    return bytes(header) + data


def data_frame(stream_id, data, flags=0):
    """Bytes of a DATA frame."""
    return build_frame(_f.TYPE_DATA, flags, stream_id, data=data)


def window_update(stream_id, delta=0, flags=0):
    """Bytes of a WINDOW_UPDATE frame (SYN/ACK/FIN/RST go in ``flags``)."""
    return build_frame(_f.TYPE_WINDOW_UPDATE, flags, stream_id, delta)


def ping_frame(value, flags=_f.FLAG_SYN):
    """Bytes of a PING request (or reply with ``flags=FLAG_ACK``)."""
    return build_frame(_f.TYPE_PING, flags, 0, value)


def go_away_frame(code=_f.GO_AWAY_NORMAL):
    """Bytes of a GO_AWAY frame."""
    return build_frame(_f.TYPE_GO_AWAY, 0, 0, code)


def parse_frames(data):
    """Parse complete frames from ``data``; raises ValueError on trailing bytes."""
    frames = []
    view = memoryview(data)
    pos = 0
    while len(data) - pos >= _f.HEADER_SIZE:
        header = _f.decode_header(view, pos)
        pos += _f.HEADER_SIZE
        body = b""
        if header.type == _f.TYPE_DATA:
            body = bytes(view[pos:pos + header.length])
            if len(body) < header.length:
                raise ValueError("truncated DATA frame")
            pos += header.length
        frames.append(Frame(header.type, header.flags, header.stream_id,
                            header.length, body, header.version))
    if pos != len(data):
        raise ValueError("trailing partial frame")
    return frames


def read_frames(transport, clear=True):
    """Every frame a StringTransport received (cleared afterwards by default)."""
    data = transport.value()
    if clear:
        transport.clear()
    return parse_frames(data)


class StreamRecorder(Protocol):
    """A protocol that records what happens to it (for stream tests)."""

    def __init__(self):
        self.data = bytearray()
        self.made = False
        self.lost = None

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(StreamRecorder):
    """A StreamRecorder that also records half-close notifications."""

    read_closed = False
    write_closed = False

    def readConnectionLost(self):
        self.read_closed = True

    def writeConnectionLost(self):
        self.write_closed = True


class RecorderFactory(Factory):
    """Builds ``protocol_class`` instances and keeps them in ``protocols``."""

    def __init__(self, protocol_class=StreamRecorder):
        self.protocol_class = protocol_class
        self.protocols = []

    def buildProtocol(self, addr):
        protocol = self.protocol_class()
        protocol.factory = self
        protocol.address = addr
        self.protocols.append(protocol)
        return protocol


class SessionPair(NamedTuple):
    """Two yamux sessions connected in memory by twisted.test.iosim."""

    client: YamuxSession
    server: YamuxSession
    pump: IOPump
    clock: Clock

    def flush(self):
        """Move every byte both ways and run calls due now (clock.advance(0))."""
        self.pump.flush()


def connected_sessions(client_stream_factory=None, server_stream_factory=None,
                       config=None, client_config=None, server_config=None, clock=None):
    """A connected client/server YamuxSession pair over iosim, driven by a task.Clock.

    iosim never pauses producers: test backpressure with a StringTransport.
    """
    clock = clock if clock is not None else Clock()
    client, server, pump = connectedServerAndClient(
        lambda: YamuxSession(False, server_stream_factory, server_config or config, clock),
        lambda: YamuxSession(True, client_stream_factory, client_config or config, clock),
        clock=clock,
    )
    return SessionPair(client, server, pump, clock)


def session_on_string_transport(is_client=False, stream_factory=None, config=None, clock=None):
    """A YamuxSession connected to a StringTransport: returns (session, transport, clock).

    Feed peer frames with ``session.dataReceived(build_frame(...))``; read what the
    session sent with ``read_frames(transport)``; call ``clock.advance(0)`` to let
    stream data be sent (the session sends DATA from a callLater(0) flush).
    """
    clock = clock if clock is not None else Clock()
    session = YamuxSession(is_client, stream_factory, config, clock)
    transport = StringTransport()
    session.makeConnection(transport)
    return session, transport, clock
