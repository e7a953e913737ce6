"""The splice: bytes both ways, backpressure, half-close and abort propagation."""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from grpcmux.splice import SpliceProtocol, splice


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes and aborts."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def joined():
    a, b = SpliceProtocol(), SpliceProtocol()
    a.makeConnection(HalfCloseTransport())
    b.makeConnection(HalfCloseTransport())
    splice(a, b)
    return a, b


def test_unjoined_end_is_held_paused_until_spliced():
    a = SpliceProtocol()
    transport = HalfCloseTransport()
    a.makeConnection(transport)
    assert transport.producerState == "paused"
    b = SpliceProtocol()
    b.makeConnection(HalfCloseTransport())
    splice(a, b)
    assert transport.producerState == "producing"


def test_bytes_flow_both_ways():
    a, b = joined()
    a.dataReceived(b"to b")
    b.dataReceived(b"to a")
    assert b.transport.value() == b"to b"
    assert a.transport.value() == b"to a"


def test_each_transport_is_the_producer_feeding_the_other():
    a, b = joined()
    assert a.transport.producer is b.transport
    assert b.transport.producer is a.transport
    assert a.transport.streaming and b.transport.streaming


def test_end_of_input_becomes_a_half_close_on_the_other_side():
    a, b = joined()
    a.readConnectionLost()
    assert b.transport.write_closed
    assert not b.transport.disconnecting


def test_transport_without_half_close_is_closed_instead():
    a = SpliceProtocol()
    a.makeConnection(HalfCloseTransport())
    b = SpliceProtocol()
    b.makeConnection(StringTransport())
    splice(a, b)
    a.readConnectionLost()
    assert b.transport.disconnecting


def test_clean_close_closes_the_other_side():
    a, b = joined()
    a.connectionLost(Failure(ConnectionDone()))
    assert b.transport.disconnecting
    assert not b.transport.aborted
    assert b.transport.producer is None


def test_abnormal_close_aborts_the_other_side():
    a, b = joined()
    a.connectionLost(Failure(ConnectionLost()))
    assert b.transport.aborted


def test_close_is_not_echoed_back():
    a, b = joined()
    a.connectionLost(Failure(ConnectionDone()))
    b.connectionLost(Failure(ConnectionDone()))
    assert not a.transport.disconnecting


def test_abort_drops_own_transport():
    a, _ = joined()
    a.abort()
    assert a.transport.aborted
