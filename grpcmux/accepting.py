"""What the multiplexer listener does with a new connection, before any handshake.

In order: the handshake gate (no more than ``max_handshakes`` at once), on a TLS
listener a check that the client speaks TLS, then TLS, then a check of the first
bytes (a gRPC caller or a TLS mismatch is told which endpoint or setting to use),
and the connection's yamux session.
"""

from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from grpcmux.addresses import describe_address
from grpcmux.preface import PrefaceGuard, judge_multiplexer_client
from grpcmux.tuning import tune_transport
from grpcmux.yamux.session import YamuxSession


def listener_factory(server):
    """The factory of ``server``'s (a MultiplexerServer) listener."""
    factory = SessionFactory(server)
    if server.tls_options is not None:
        factory = TLSMemoryBIOFactory(server.tls_options, False, factory)
        factory.noisy = False
        factory = PlaintextCheck(factory)
    return HandshakeGate(server, factory)


class HandshakeGate(Factory):
    """Refuses connections while ``max_handshakes`` are in progress.

    The server stops accepting when its handshakes are full, but one accept batch
    may hold more connections; those are closed at once.
    """

    noisy = False

    def __init__(self, server, factory):
        self._server = server
        self._factory = factory

    def buildProtocol(self, addr):
        if self._server.handshakes_full:
            return None
        return self._factory.buildProtocol(addr)


class ServerSession(YamuxSession):
    """A client's session; ``on_transport_lost`` hears when its connection is gone
    (after a polite close, later than the session's own end)."""

    on_transport_lost = None

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        if self.on_transport_lost is not None:
            self.on_transport_lost()


class SessionFactory(Factory):
    """A yamux session per connection, behind a check of the first bytes; the
    server hears of each (``connection_accepted``)."""

    noisy = False

    def __init__(self, server):
        self._server = server
        tls_port = server.tls_options is not None
        self._judge = lambda data: judge_multiplexer_client(data, tls_port, inside_tls=tls_port)

    def buildProtocol(self, addr):
        session = ServerSession(
            is_client=False, config=self._server.yamux_config, clock=self._server.reactor,
            tune_transport=tune_transport,
        )
        self._server.connection_accepted(session, addr)
        return PrefaceGuard(session, self._judge, describe_address)


class PlaintextCheck(Factory):
    """In front of a TLS endpoint's factory: a client without --tls is told so."""

    noisy = False

    def __init__(self, tls_factory):
        self._tls_factory = tls_factory

    def doStart(self):
        self._tls_factory.doStart()

    def doStop(self):
        self._tls_factory.doStop()

    def buildProtocol(self, addr):
        protocol = self._tls_factory.buildProtocol(addr)
        if protocol is None:
            return None
        return PrefaceGuard(
            protocol, lambda data: judge_multiplexer_client(data, tls_port=True),
            describe_address)
