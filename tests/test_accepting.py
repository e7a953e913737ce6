"""grpcmux.accepting: the factories in front of a multiplexer client's session."""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from grpcmux.accepting import (
    HandshakeGate,
    PlaintextCheck,
    ServerSession,
    listener_factory,
)
from grpcmux.config import ServerSettings
from grpcmux.preface import TLS_ALERT_PROTOCOL_VERSION
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer
from grpcmux.testing import window_update
from grpcmux.yamux.frame import FLAG_SYN

ADDRESS = IPv4Address("TCP", "192.0.2.7", 4567)


def server(**settings):
    return MultiplexerServer(Clock(), ClientRegistry(), ServerSettings(**settings))


def test_a_plain_listener_gates_a_session_factory():
    mux = server()
    factory = listener_factory(mux)
    assert isinstance(factory, HandshakeGate)
    guard = factory.buildProtocol(ADDRESS)
    assert isinstance(guard.protocol, ServerSession)
    [connection] = mux.connections
    assert connection.session is guard.protocol and connection.remote_address == "192.0.2.7:4567"
    assert guard.protocol.config is mux.yamux_config


def test_the_gate_closes_connections_beyond_max_handshakes():
    mux = server(max_handshakes=1)
    gate = listener_factory(mux)
    assert gate.buildProtocol(ADDRESS) is not None
    assert mux.handshakes_full
    assert gate.buildProtocol(ADDRESS) is None
    assert len(mux.connections) == 1


def test_the_session_hears_when_its_transport_is_gone():
    session = ServerSession(is_client=False, config=server().yamux_config, clock=Clock())
    lost = []
    session.on_transport_lost = lambda: lost.append(session.closed)
    session.makeConnection(StringTransport())
    session.connectionLost(Failure(ConnectionDone()))
    assert lost == [True]  # after the session's own end


def test_a_tls_listener_answers_a_plaintext_client_with_a_tls_alert(pki):
    mux = server(tls_cert=pki.server.cert, tls_key=pki.server.key)
    guard = listener_factory(mux).buildProtocol(ADDRESS)
    assert isinstance(guard.protocol, TLSMemoryBIOProtocol)
    transport = StringTransport(peerAddress=ADDRESS)
    guard.makeConnection(transport)
    guard.dataReceived(window_update(1, flags=FLAG_SYN))  # yamux, not TLS
    assert transport.value().startswith(TLS_ALERT_PROTOCOL_VERSION) and transport.disconnecting


def test_the_plaintext_check_starts_and_stops_the_tls_factory():
    calls = []

    class Inner:
        def doStart(self):
            calls.append("start")

        def doStop(self):
            calls.append("stop")

        def buildProtocol(self, addr):
            return None

    check = PlaintextCheck(Inner())
    check.doStart()
    assert check.buildProtocol(ADDRESS) is None
    check.doStop()
    assert calls == ["start", "stop"]
