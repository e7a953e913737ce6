"""A loopback TCP relay that can black-hole its connections and recover.

While held, nothing is forwarded and nothing is closed: both sides stop being
read (bytes stay in the kernel buffers), and new connections are accepted but
not connected onward — to the peers it looks like a link that went silent.
``release()`` forwards everything again.
"""

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class _End(Protocol):
    def __init__(self, relay):
        self.relay = relay
        self.peer = None
        self.pending = []

    def connectionMade(self):
        self.relay.ends.add(self)
        if self.relay.held:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason=None):
        self.relay.ends.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()

    def joined(self, peer):
        self.peer = peer
        for data in self.pending:
            peer.transport.write(data)
        self.pending = []


class _Outbound(_End):
    def __init__(self, relay, inbound):
        super().__init__(relay)
        self.inbound = inbound

    def connectionMade(self):
        super().connectionMade()
        if self.inbound.transport.disconnected:
            self.transport.loseConnection()
            return
        self.joined(self.inbound)
        self.inbound.joined(self)


class _Inbound(_End):
    def connectionMade(self):
        super().connectionMade()
        accepted, self.relay.accepted = self.relay.accepted, []
        for waiter in accepted:
            waiter.callback(self)
        if self.relay.held:
            self.relay.waiting.append(self)
        else:
            self.relay.connect_onward(self)


class _OutboundFactory(ClientFactory):
    def __init__(self, relay, inbound):
        self.relay = relay
        self.inbound = inbound

    def buildProtocol(self, addr):
        return _Outbound(self.relay, self.inbound)

    def clientConnectionFailed(self, connector, reason):
        self.inbound.transport.loseConnection()


class Relay:
    """Listens on 127.0.0.1:<port chosen by the system>, forwards to ``target``."""

    def __init__(self, reactor, target_host, target_port):
        self.reactor = reactor
        self.target = (target_host, target_port)
        self.held = False
        self.ends = set()
        self.waiting = []
        self.accepted = []  # Deferreds waiting for the next inbound connection
        factory = Factory()
        factory.buildProtocol = lambda addr: _Inbound(self)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    @property
    def address(self):
        return f"127.0.0.1:{self.port.getHost().port}"

    def connect_onward(self, inbound):
        self.reactor.connectTCP(*self.target, _OutboundFactory(self, inbound))

    def when_accepted(self, timeout=30.0):
        """A Deferred firing when the next connection arrives."""
        waiter = Deferred()
        self.accepted.append(waiter)
        return waiter.addTimeout(timeout, self.reactor)

    def hold(self):
        """Black-hole every connection: forward nothing, close nothing."""
        self.held = True
        for end in self.ends:
            end.transport.pauseProducing()

    def release(self):
        self.held = False
        for end in list(self.ends):
            end.transport.resumeProducing()
        waiting, self.waiting = self.waiting, []
        for inbound in waiting:
            if inbound in self.ends:
                self.connect_onward(inbound)

    def close(self):
        for end in list(self.ends):
            end.transport.abortConnection()
        return self.port.stopListening()
