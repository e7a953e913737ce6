"""Open yamux streams through Twisted's endpoint API."""

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from .address import StreamAddress


@implementer(IStreamClientEndpoint)
class YamuxStreamClientEndpoint:
    """Each connect() opens a new stream of ``session`` (peer-opened streams go to
    the session's stream_factory instead)."""

    def __init__(self, session):
        self._session = session

    def connect(self, protocolFactory):
        """Build a protocol and connect it to a new stream; fails like open_stream."""
        session = self._session
        try:
            session.check_can_open()
            address = StreamAddress(session.peer_address(), session.next_stream_id)
            protocol = protocolFactory.buildProtocol(address)
            if protocol is None:
                raise ValueError(f"{protocolFactory!r} built no protocol")
            session.open_stream(protocol)
        except Exception:
            return defer.fail()
        return defer.succeed(protocol)
