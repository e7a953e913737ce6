"""A connection's first bytes, read for who dialled the wrong endpoint.

Swapped ports are the commonest setup mistake: a gRPC caller (HTTP/2) on the
multiplexer endpoint, a multiplexer client on the proxy endpoint, TLS on one side
only.  yamux would report "invalid protocol version 80"; these checks recognise
the peer's first bytes and say which endpoint or TLS setting it should use.

:class:`PrefaceGuard` sits in front of a connection's protocol until the first
bytes are judged, then forwards everything; the protocol is connected to the real
transport, so TLS peer names and flow control are untouched.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from grpcmux.http2.frames import ERROR_PROTOCOL_ERROR, PREFACE, TYPE_GOAWAY, TYPE_SETTINGS

# Sentinel verdict: the bytes are what the protocol expects (or not ours to judge).
PASS = "pass"
# TLS record types a peer starts with: handshake (ClientHello/ServerHello), alert.
_TLS_HANDSHAKE = 0x16
_TLS_ALERT = 0x15
# Enough to judge any preface here; past it, the bytes go on unjudged.
_MOST = len(PREFACE)
# A fatal TLS alert (protocol_version): what a TLS client gets for plaintext.
TLS_ALERT_PROTOCOL_VERSION = bytes([_TLS_ALERT, 3, 3, 0, 2, 2, 70])

NO_TLS_HERE = b"grpcmux: this multiplexer endpoint does not serve TLS\r\n"

PROXY_HINT = (
    "gRPC callers use the proxy endpoint (--proxy-listener, default port 7592), "
    "not the multiplexer endpoint")


class WrongEndpoint(Exception):
    """The peer speaks another protocol than this endpoint's; ``str()`` says which."""


class Wrong:
    """A verdict: the peer dialled the wrong endpoint; *reply* is sent before closing."""

    def __init__(self, message, reply=b""):
        self.message = message
        self.reply = reply


def _http2_goaway(debug):
    """An HTTP/2 SETTINGS + GOAWAY(PROTOCOL_ERROR) whose debug data says why."""
    payload = (0).to_bytes(4, "big") + ERROR_PROTOCOL_ERROR.to_bytes(4, "big") + debug
    return (_frame_header(0, TYPE_SETTINGS)
            + _frame_header(len(payload), TYPE_GOAWAY) + payload)


def _frame_header(length, kind):
    return length.to_bytes(3, "big") + bytes([kind, 0]) + (0).to_bytes(4, "big")


def _looks_like_http2_preface(data):
    """True / False, or None while the bytes so far are a prefix of the preface."""
    if PREFACE.startswith(data[:_MOST]):
        return True if len(data) >= 4 else None  # "PRI " is distinctive enough
    return False


def judge_multiplexer_client(data, tls_port, inside_tls=False):
    """What the first bytes a multiplexer endpoint received say about the peer.

    *tls_port*: the endpoint serves TLS; *inside_tls*: *data* is what came through
    the TLS layer (a TLS port's outer check has *inside_tls* False).
    """
    first = data[0]
    if first == 0:  # a yamux header (version 0)
        if tls_port and not inside_tls:
            return Wrong("sent plaintext to the TLS multiplexer endpoint: the client "
                         "needs --tls (and --tls-ca unless the system trusts the "
                         "server's certificate)", TLS_ALERT_PROTOCOL_VERSION)
        return PASS
    if first == _TLS_HANDSHAKE and not inside_tls:
        if tls_port:
            return PASS
        # Plain text where a ServerHello belongs: the client's TLS fails at once
        # ("wrong version number"), not by waiting for a handshake that never comes.
        return Wrong("started TLS on the plaintext multiplexer endpoint: the client has "
                     "--tls, this server has no --tls-cert", NO_TLS_HERE)
    http2 = _looks_like_http2_preface(data)
    if http2 is None:
        return None
    if http2:
        return Wrong(f"sent an HTTP/2 preface: {PROXY_HINT}",
                     _http2_goaway(PROXY_HINT.encode()))
    if tls_port and not inside_tls:
        return Wrong("sent something other than TLS to the TLS multiplexer endpoint",
                     TLS_ALERT_PROTOCOL_VERSION)
    return PASS


def judge_multiplexer_server(data):
    """What the first bytes from the server a (plaintext) client dialled say about it."""
    if data[0] in (_TLS_HANDSHAKE, _TLS_ALERT) and len(data) >= 2 and data[1] == 3:
        return Wrong("the server speaks TLS: connect with --tls")
    if data[0] != 0:
        return PASS
    if len(data) < 9:
        return None
    # An HTTP/2 SETTINGS frame on stream 0 (what an HTTP/2 server sends first). As a
    # yamux header this would be a FIN on stream 0, which no yamux peer sends.
    length = int.from_bytes(data[:3], "big")
    if data[3] == TYPE_SETTINGS and data[4] == 0 and data[5:9] == bytes(4) and length % 6 == 0:
        return Wrong("the server answered with HTTP/2: it is a proxy endpoint "
                     "(--proxy-listener); dial the server's multiplexer endpoint "
                     "(--multiplexer-listener, default port 7602)")
    return PASS


class PrefaceGuard(Protocol):
    """Holds a connection's first bytes until *judge* accepts them.

    ``judge(data)`` returns ``PASS``, ``None`` (need more bytes) or a :class:`Wrong`.
    On ``Wrong`` the reply is sent, the connection closed, and *protocol* loses
    its connection with :class:`WrongEndpoint`; *describe* (the peer's address as
    text) given, the verdict is also logged as a warning.
    """

    _log = Logger()

    def __init__(self, protocol, judge, describe=None):
        self.protocol = protocol
        self._judge = judge
        self._describe = describe
        self._buffer = b""
        self._decided = False
        self._lost = False
        if IHalfCloseableProtocol.providedBy(protocol):
            alsoProvides(self, IHalfCloseableProtocol)

    def makeConnection(self, transport):
        self.connected = 1
        self.transport = transport
        self.protocol.makeConnection(transport)

    def dataReceived(self, data):
        if self._decided:
            self.protocol.dataReceived(data)
            return
        self._buffer += data
        verdict = self._judge(self._buffer)
        if verdict is None and len(self._buffer) < _MOST:
            return
        self._decided = True
        data, self._buffer = self._buffer, b""
        if isinstance(verdict, Wrong):
            self._refuse(verdict)
        else:
            self.protocol.dataReceived(data)

    def _refuse(self, verdict):
        if self._describe is not None:
            self._log.warn("{remote_address} {problem}; closing",
                           remote_address=self._describe(self.transport.getPeer()),
                           problem=verdict.message)
        if verdict.reply:
            self.transport.write(verdict.reply)
        self.transport.loseConnection()
        self._lost = True
        self.protocol.connectionLost(Failure(WrongEndpoint(verdict.message)))

    def readConnectionLost(self):
        if not self._lost:
            self.protocol.readConnectionLost()

    def writeConnectionLost(self):
        if not self._lost:
            self.protocol.writeConnectionLost()

    def connectionLost(self, reason=None):
        if self._lost:
            return
        self._lost = True
        if self._buffer:  # fewer bytes than a verdict needs: the protocol judges them
            data, self._buffer = self._buffer, b""
            self.protocol.dataReceived(data)
        self.protocol.connectionLost(reason)
