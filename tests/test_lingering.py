"""grpcmux.lingering: transports of closed sessions get a deadline, on a ``task.Clock``."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from grpcmux.lingering import LingeringTransports


def closing():
    """A transport whose polite close never completes (its peer reads nothing)."""
    transport = StringTransport()
    transport.connected = True
    transport.loseConnection()
    return transport


def test_a_transport_still_open_at_its_deadline_is_aborted_and_logged(log_events):
    clock = Clock()
    lingering = LingeringTransports(clock)
    transport = closing()
    lingering.linger(transport, "192.0.2.7:4567", 3.0)
    clock.advance(2.9)
    assert len(lingering) == 1 and not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected and len(lingering) == 0
    assert [formatEvent(e) for e in log_events] == [
        "connection from 192.0.2.7:4567 still open 3 s after its session closed "
        "(the peer reads nothing); aborting it"]


def test_a_transport_gone_by_itself_is_forgotten():
    clock = Clock()
    lingering = LingeringTransports(clock)
    transport = closing()
    lingering.linger(transport, "192.0.2.7:4567", 3.0)
    lingering.gone(transport)
    lingering.gone(transport)  # twice is harmless
    assert len(lingering) == 0 and not clock.getDelayedCalls()
    assert not transport.disconnected


def test_abort_all_aborts_now_and_watches_no_new_ones(log_events):
    clock = Clock()
    lingering = LingeringTransports(clock)
    first, second = closing(), closing()
    lingering.linger(first, "192.0.2.7:1", 3.0)
    lingering.abort_all()
    assert first.disconnected and not clock.getDelayedCalls()
    assert log_events == []  # a stop, not a peer's fault
    lingering.linger(second, "192.0.2.7:2", 3.0)
    assert len(lingering) == 0 and not clock.getDelayedCalls()
