"""Unit tests of grpcmux.client: attempts, handshake, backoff, stop and the dialer.

The reactor is twisted's MemoryReactorClock: connects are recorded and completed
(or refused) by the test on StringTransports, time moves with ``advance``.  The
test plays the multiplexer server by feeding the session its frames.
"""

import random

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings
from grpcmux.handshake import MAGIC, encode_message
from grpcmux.ids import client_id_problem
from grpcmux.testing import data_frame, go_away_frame, parse_frames, window_update
from grpcmux.yamux import frame as f

ACK = f.FLAG_ACK


class Policy:
    """A retry policy remembering what it was asked: seconds = 1 + failed attempts / 100."""

    def __init__(self):
        self.attempts = []

    def __call__(self, attempt):
        self.attempts.append(attempt)
        return 1 + attempt / 100 + 0.123456789


class Rng(random.Random):
    """randrange answers from a list (the dialer's random starts)."""

    def __init__(self, *answers):
        super().__init__(0)
        self.answers = list(answers)

    def randrange(self, n):
        return self.answers.pop(0) % n if self.answers else 0


@implementer(IHostnameResolver)
class Resolver:
    def __init__(self, names):
        self.names = names
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, **kwargs):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for host in self.names.get(hostName, ()):
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, portNumber))
        receiver.resolutionComplete()
        return receiver


class Rig:
    """A client service on a MemoryReactorClock, and the connections it dials."""

    def __init__(self, addresses="127.0.0.1:7602", rng=None, resolver=None, wire="native",
                 handshake_timeout=10.0, client_id="edge", backend_health=None):
        self.reactor = MemoryReactorClock()
        self.policy = Policy()
        settings = ClientSettings(client_id=client_id, grpc_server_address="127.0.0.1:50051",
                                  multiplexer_address=addresses, wire_protocol=wire,
                                  shutdown_grace=5.0)
        self.tunnel = Tunnel(self.reactor, settings, handshake_timeout=handshake_timeout,
                             retry_policy=self.policy, backend_health=backend_health)
        self.problems = []
        self.tunnel.add_problem_observer(self.problems.append)
        self.service = TunnelClientService(self.reactor, self.tunnel, resolver=resolver,
                                           rng=rng or Rng())
        self.dialled = 0

    def start(self):
        self.service.startService()
        return self

    def pending(self):
        """(host, port) of the connects not yet answered."""
        return [(c[0], c[1]) for c in self.reactor.tcpClients[self.dialled:]]

    def accept(self):
        """Complete the oldest pending connect: returns (protocol, transport)."""
        host, port, factory = self.reactor.tcpClients[self.dialled][:3]
        self.dialled += 1
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self):
        host, port, factory = self.reactor.tcpClients[self.dialled][:3]
        connector = self.reactor.connectors[self.dialled]
        self.dialled += 1
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def answer(self, protocol, message):
        """The server ACKs the control stream and sends ``message`` (a ServerMessage)."""
        protocol.dataReceived(window_update(1, 0, ACK)
                              + data_frame(1, encode_message(message)))

    def welcome(self, protocol):
        self.answer(protocol, tunnel_pb2.ServerMessage(welcome=tunnel_pb2.Welcome()))

    def reject(self, protocol, code=tunnel_pb2.Reject.CODE_ALREADY_EXISTS, why="taken"):
        self.answer(protocol, tunnel_pb2.ServerMessage(
            reject=tunnel_pb2.Reject(code=code, message=why)))

    def retry_delays(self):
        return sorted(round(call.getTime() - self.reactor.seconds(), 6)
                      for call in self.reactor.getDelayedCalls() if call.active())


def lost(protocol):
    protocol.connectionLost(Failure(ConnectionDone()))


def frames(transport):
    found = parse_frames(transport.value())
    transport.clear()
    return found


def texts(events):
    return [formatEvent(event) for event in events]


# -- the handshake is the attempt ---------------------------------------------------

def test_hello_goes_on_the_first_stream_and_welcome_admits():
    rig = Rig().start()
    assert rig.pending() == [("127.0.0.1", 7602)]
    protocol, transport = rig.accept()
    rig.reactor.advance(0)  # stream data goes out with the next flush
    assert MAGIC in transport.value()
    got = []
    rig.service.when_connected().addCallback(got.append)
    rig.welcome(protocol)
    assert got == []  # delivered from a later turn, outside ClientService's machine
    rig.reactor.advance(0)
    [session] = got
    assert rig.tunnel.session is session and session.admitted and not session.closed
    assert rig.problems == []


class Guard:
    """Stands in for the BackendHealthChecker: its guard is the gRPC server's endpoint."""

    def __init__(self):
        self.guarded = []
        self.connects = 0
        self.welcomes = []

    def guard(self, endpoint):
        self.guarded.append(endpoint)
        return self

    def connect(self, factory):
        self.connects += 1
        return Deferred()  # the gRPC server has not answered yet

    def welcomed(self, welcome, control):
        self.welcomes.append(welcome)
        return welcome


def test_streams_reach_the_grpc_server_through_the_health_checkers_guard():
    guard = Guard()
    rig = Rig(backend_health=guard).start()
    assert len(guard.guarded) == 1  # the gRPC server's endpoint, guarded once
    protocol, _ = rig.accept()
    rig.welcome(protocol)
    assert len(guard.welcomes) == 1 and rig.tunnel.session is not None
    protocol.dataReceived(window_update(2, 0, f.FLAG_SYN))  # the server opens a stream
    assert guard.connects == 1
    rig.service.stopService()


def test_a_client_without_an_id_gets_a_random_one():
    client_id = Rig(client_id=None).tunnel.client_id
    assert client_id and client_id_problem(client_id) is None


def test_refusals_are_failed_attempts_with_growing_backoff():
    rig = Rig().start()
    for attempt in (1, 2, 3):
        protocol, transport = rig.accept()
        rig.reject(protocol)
        assert transport.disconnecting  # the client closes the refused session
        assert rig.policy.attempts[-1] == attempt  # not reset: no admission
        lost(protocol)  # the end of an unadmitted connection reaches nobody else
        assert rig.pending() == []
        rig.reactor.advance(rig.retry_delays()[0])
        assert len(rig.pending()) == 1
    assert rig.problems[0] == ("multiplexer 127.0.0.1:7602 refused client edge: "
                               "CODE_ALREADY_EXISTS: taken")
    assert rig.tunnel.session is None


def test_handshake_timeout_is_a_failed_attempt():
    rig = Rig(handshake_timeout=4.0).start()
    protocol, transport = rig.accept()
    rig.reactor.advance(3.9)
    assert rig.problems == [] and not transport.disconnecting
    rig.reactor.advance(0.1)
    assert rig.problems and "no Welcome within 4 s" in rig.problems[0]
    assert transport.disconnecting and rig.policy.attempts == [1]
    assert frames(transport)[-1].type == f.TYPE_GO_AWAY
    lost(protocol)
    rig.reactor.advance(rig.retry_delays()[0])
    assert len(rig.pending()) == 1


def test_connection_lost_during_the_handshake_is_a_failed_attempt():
    rig = Rig().start()
    protocol, _ = rig.accept()
    lost(protocol)  # no NoTransition from ClientService: it never hears of this one
    assert "closed the control stream without a Welcome" in rig.problems[0]
    assert rig.policy.attempts == [1]
    rig.reactor.advance(rig.retry_delays()[0])
    assert len(rig.pending()) == 1


def test_admitted_session_lost_reconnects_with_backoff_reset():
    rig = Rig().start()
    protocol, _ = rig.accept()
    rig.reject(protocol)
    lost(protocol)
    rig.reactor.advance(rig.retry_delays()[0])
    protocol, _ = rig.accept()
    rig.welcome(protocol)
    lost(protocol)
    assert rig.policy.attempts == [1, 1]  # the admission reset the count
    assert rig.problems[-1] == ("client edge lost its session with multiplexer "
                                "127.0.0.1:7602 (Connection was closed cleanly.); reconnecting")
    rig.reactor.advance(rig.retry_delays()[0])
    assert len(rig.pending()) == 1


def test_legacy_session_is_admitted_when_the_server_answers_a_ping():
    rig = Rig(wire="legacy").start()
    protocol, transport = rig.accept()
    sent = frames(transport)
    ping = [fr for fr in sent if fr.type == f.TYPE_PING][0]
    assert rig.tunnel.session is None
    protocol.dataReceived(f.encode_header(f.TYPE_PING, ACK, 0, ping.length))
    assert rig.tunnel.session is not None and rig.tunnel.session.admitted


def test_legacy_session_without_a_ping_answer_times_out():
    rig = Rig(wire="legacy", handshake_timeout=3.0).start()
    protocol, transport = rig.accept()
    rig.reactor.advance(3.0)
    assert rig.problems == ["multiplexer 127.0.0.1:7602 refused client edge: "
                            "no answer to a ping within 3 s"]
    assert transport.disconnecting and rig.policy.attempts == [1]
    lost(protocol)


# -- stopping ---------------------------------------------------------------------

def test_stop_drains_and_neither_reports_nor_reconnects(log_events):
    rig = Rig().start()
    protocol, transport = rig.accept()
    rig.welcome(protocol)
    transport.clear()
    stopped = rig.service.stopService()
    assert go_away_frame() in transport.value() and transport.disconnecting
    lost(protocol)
    assert stopped.called
    assert rig.reactor.getDelayedCalls() == [] and rig.pending() == []
    lines = texts(log_events)
    assert not any("lost its session" in line or "Scheduling retry" in line
                   for line in lines), lines
    assert rig.problems == []


def test_stop_during_the_handshake_closes_the_session_quietly():
    rig = Rig().start()
    protocol, transport = rig.accept()
    stopped = rig.service.stopService()
    assert transport.disconnecting
    lost(protocol)
    assert stopped.called and rig.problems == []
    assert rig.reactor.getDelayedCalls() == []


def test_stop_while_waiting_to_retry_cancels_the_retry():
    rig = Rig().start()
    rig.refuse()
    assert rig.retry_delays()
    stopped = rig.service.stopService()
    assert stopped.called and rig.reactor.getDelayedCalls() == []


def test_server_go_away_drains_then_reconnects_elsewhere():
    rig = Rig("127.0.0.1:7001,127.0.0.1:7002").start()
    protocol, transport = rig.accept()
    rig.welcome(protocol)
    protocol.dataReceived(go_away_frame())
    assert transport.disconnecting  # no stream in flight: leaves at once
    lost(protocol)
    rig.reactor.advance(rig.retry_delays()[0])
    assert rig.pending() == [("127.0.0.1", 7002)]
    assert not any("lost" in problem for problem in rig.problems[:-1])


# -- log lines ----------------------------------------------------------------------

def test_retry_lines_name_the_addresses_with_readable_seconds(log_events):
    rig = Rig("127.0.0.1:7001,[::1]:7002").start()
    rig.refuse()
    rig.refuse()
    lines = [line for line in texts(log_events) if "Scheduling retry" in line]
    assert lines == ["Scheduling retry 1 to connect multiplexer 127.0.0.1:7001,[::1]:7002 "
                     "in 1.13 seconds."]
    assert rig.problems == [
        "client edge cannot connect to multiplexer 127.0.0.1:7001: Connection was refused "
        "by other side.; [::1]:7002: Connection was refused by other side.; retrying"]
    assert not any("object at 0x" in line for line in texts(log_events))


# -- the dialer: several addresses, host names ----------------------------------------

def test_starts_at_a_random_address_and_moves_on_when_one_refuses():
    rig = Rig("127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003", rng=Rng(1)).start()
    assert rig.pending() == [("127.0.0.1", 7002)]
    rig.refuse()
    assert rig.pending() == [("127.0.0.1", 7003)]  # at once, same attempt
    assert rig.policy.attempts == []
    protocol, _ = rig.accept()
    rig.reject(protocol)  # refused by the server: the next attempt goes on
    lost(protocol)
    rig.reactor.advance(rig.retry_delays()[0])
    assert rig.pending() == [("127.0.0.1", 7001)]
    rig.refuse()
    rig.refuse()
    rig.refuse()  # every address failed: one failed attempt
    assert rig.policy.attempts == [1, 2]
    rig.reactor.advance(rig.retry_delays()[0])
    assert rig.pending() == [("127.0.0.1", 7001)]  # the next turn starts where it was
    rig.service.stopService()


def test_each_attempt_starts_after_the_address_used_last():
    rig = Rig("127.0.0.1:7001,127.0.0.1:7002", rng=Rng(0)).start()
    seen = []
    for _ in range(4):
        seen.append(rig.pending()[0][1])
        protocol, _ = rig.accept()
        rig.welcome(protocol)
        lost(protocol)
        rig.reactor.advance(rig.retry_delays()[0])
    assert seen == [7001, 7002, 7001, 7002]
    rig.service.stopService()


def test_a_host_name_stands_for_all_its_addresses_in_turn():
    resolver = Resolver({"mux.test": ["127.0.0.1", "::1"]})
    rig = Rig("mux.test:7602", rng=Rng(0, 1), resolver=resolver).start()
    assert rig.pending() == [("::1", 7602)]  # a random one of them first
    rig.refuse()
    assert rig.pending() == [("127.0.0.1", 7602)]
    protocol, _ = rig.accept()
    rig.welcome(protocol)
    assert rig.tunnel.session.address == "mux.test:7602 (127.0.0.1)"
    lost(protocol)
    rig.reactor.advance(rig.retry_delays()[0])
    assert rig.pending() == [("::1", 7602)]  # resolved again, the next address
    assert resolver.asked == ["mux.test", "mux.test"]
    rig.service.stopService()


def test_a_name_that_resolves_to_nothing_moves_on():
    resolver = Resolver({"good.test": ["127.0.0.1"]})
    rig = Rig("gone.test:7602,good.test:7603", rng=Rng(0), resolver=resolver).start()
    assert rig.pending() == [("127.0.0.1", 7603)]
    rig.refuse()
    assert rig.problems == [
        "client edge cannot connect to multiplexer gone.test:7602: DNS lookup failed: "
        "gone.test resolves to no address.; good.test:7603 (127.0.0.1): Connection was "
        "refused by other side.; retrying"]
    rig.service.stopService()


def test_a_stopped_service_starts_again():
    rig = Rig().start()
    protocol, _ = rig.accept()
    rig.welcome(protocol)
    rig.service.stopService()
    lost(protocol)
    rig.service.startService()
    protocol, _ = rig.accept()
    rig.reject(protocol)
    assert rig.problems == ["multiplexer 127.0.0.1:7602 refused client edge: "
                            "CODE_ALREADY_EXISTS: taken"]
    lost(protocol)
    rig.service.stopService()
