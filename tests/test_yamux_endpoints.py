"""Tests for grpcmux.yamux.endpoints."""

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from zope.interface.verify import verifyObject

from grpcmux.testing import RecorderFactory, connected_sessions
from grpcmux.yamux.address import StreamAddress
from grpcmux.yamux.endpoints import YamuxStreamClientEndpoint
from grpcmux.yamux.errors import GoAwayReceived, SessionClosed


def test_connect_opens_a_stream():
    server_factory = RecorderFactory()
    pair = connected_sessions(server_stream_factory=server_factory)
    endpoint = YamuxStreamClientEndpoint(pair.client)
    assert verifyObject(IStreamClientEndpoint, endpoint)
    factory = RecorderFactory()
    results = []
    endpoint.connect(factory).addCallback(results.append)
    proto, = results
    assert proto is factory.protocols[0] and proto.made
    assert proto.address == StreamAddress(pair.client.transport.getPeer(), 1)
    assert proto.transport.stream_id == 1
    proto.transport.write(b"hi")
    pair.flush()
    assert server_factory.protocols[0].data == b"hi"


def test_connect_fails_on_closed_session():
    pair = connected_sessions()
    pair.client.close()
    failures = []
    YamuxStreamClientEndpoint(pair.client).connect(RecorderFactory()).addErrback(failures.append)
    assert failures[0].check(SessionClosed)


def test_connect_fails_after_go_away():
    pair = connected_sessions()
    pair.server.go_away()
    pair.flush()
    failures = []
    YamuxStreamClientEndpoint(pair.client).connect(RecorderFactory()).addErrback(failures.append)
    assert failures[0].check(GoAwayReceived)


def test_connect_fails_when_factory_builds_nothing():
    pair = connected_sessions()

    class Nothing(Factory):
        def buildProtocol(self, addr):
            return None

    failures = []
    YamuxStreamClientEndpoint(pair.client).connect(Nothing()).addErrback(failures.append)
    assert failures[0].check(ValueError)
    assert pair.client.streams == {}
