"""Join two transports into one byte pipe, with backpressure and half-close.

The model is ``twisted.protocols.portforward``: each side's protocol writes what it
reads into the other side's transport, and each transport is registered as the
producer feeding the other, so a slow reader pauses the fast writer instead of
growing a buffer.  End of stream is forwarded as a half-close (a yamux FIN or a TCP
shutdown) and an abnormal end as an abort (a yamux RST or a TCP reset), so neither
the gRPC caller nor the backend ever waits on a pipe whose other end has gone.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from grpcmux.writes import BATCH, batched


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """One end of a splice; bytes it reads go to its peer's transport.

    Until ``splice`` joins it to a peer, the end is held paused, so whatever
    arrives early stays in its transport's bounded buffer rather than here.
    ``closed`` turns true when its connection is lost.
    """

    peer = None
    closed = False

    def connectionMade(self):
        if self.peer is None:
            self.transport.pauseProducing()

    @batched
    def dataReceived(self, data):
        transport = self.peer.transport
        transport.write(data)
        BATCH.wrote(transport)

    def readConnectionLost(self):
        if self.peer is not None:
            _half_close(self.peer.transport)

    def writeConnectionLost(self):
        """Our write side is shut; nothing to do until the read side ends too."""

    def connectionLost(self, reason=None):
        self.closed = True
        peer, self.peer = self.peer, None
        if peer is None or peer.closed:
            return
        peer.peer = None
        peer.transport.unregisterProducer()
        if reason is None or reason.check(ConnectionDone):
            peer.transport.loseConnection()
        else:
            _abort(peer.transport)

    def abort(self):
        """Drop this end at once; the peer is aborted in turn."""
        if not self.closed:
            _abort(self.transport)


def splice(a, b):
    """Join two connected ``SpliceProtocol`` ends and let bytes flow both ways."""
    a.peer, b.peer = b, a
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)
    a.transport.resumeProducing()
    b.transport.resumeProducing()


def _half_close(transport):
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        transport.loseConnection()
    else:
        lose_write()


def _abort(transport):
    abort = getattr(transport, "abortConnection", None)
    if abort is None:
        transport.loseConnection()
    else:
        abort()
