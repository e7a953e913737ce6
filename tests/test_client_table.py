"""grpcmux.client_table: who gets which id, on fake connections and a ``task.Clock``."""

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.admission import Admission
from grpcmux.client_table import ClientTable
from grpcmux.config import ServerSettings
from grpcmux.handshake import WIRE_NATIVE, ClientHello, HandshakeRejected



class FakeSession:
    transport = None  # no TLS: no certificate names

    def __init__(self):
        self.pings = []
        self.aborted = False

    def ping(self):
        self.pings.append(Deferred())
        return self.pings[-1]

    def abort(self):
        self.aborted = True


class FakeConnection:
    remote_address = "192.0.2.7:4567"

    def __init__(self, client_id):
        self.hello = ClientHello(client_id=client_id, wire_protocol=WIRE_NATIVE)
        self.session = FakeSession()
        self.admitted = False
        self.departed = None

    @property
    def client_id(self):
        return self.hello.client_id

    def depart(self, reason):
        self.departed = reason


class FakeClusterClaims:
    def __init__(self, result=None):
        self.result = result
        self.claimed, self.released = [], []

    def claim(self, client_id):
        self.claimed.append(client_id)
        return fail(self.result) if self.result is not None else succeed(None)

    def release(self, client_id):
        self.released.append(client_id)


def table(cluster_claims=None, **settings):
    clock = Clock()
    return clock, ClientTable(clock, ServerSettings(**settings), Admission(), cluster_claims)


def outcome(d):
    """None if ``d`` succeeded, the refusal's code if it failed, "pending" else."""
    if not d.called:
        return "pending"
    results = []
    d.addCallbacks(lambda _: results.append(None),
                   lambda failure: results.append(failure.trap(HandshakeRejected)
                                                  and failure.value.code))
    return results[0]


def listed(clients, client_id):
    connection = FakeConnection(client_id)
    assert outcome(clients.admit(connection)) is None
    connection.admitted = True
    clients.list(connection)
    return connection


def test_a_free_well_formed_id_is_admitted_and_listed():
    _, clients = table()
    connection = listed(clients, "edge")
    assert clients.holder("edge") is connection and clients.is_listed(connection)
    assert clients.listed == {"edge": connection}


@pytest.mark.parametrize("client_id", ["", "two words", "a/b", "x" * 200])
def test_a_malformed_id_is_refused(client_id):
    _, clients = table()
    assert outcome(clients.admit(FakeConnection(client_id))) == tunnel_pb2.Reject.CODE_BAD_CLIENT_ID


def test_the_admission_policy_is_asked():
    clock = Clock()
    clients = ClientTable(clock, ServerSettings(), Admission(client_ca=True,
                                                             client_id_from_cert=True))
    refused = outcome(clients.admit(FakeConnection("edge")))
    assert refused == tunnel_pb2.Reject.CODE_PERMISSION_DENIED


def test_max_clients_counts_pending_and_leaving_clients_until_forgotten():
    _, clients = table(max_clients=2)
    first = listed(clients, "a")
    pending = FakeConnection("b")
    clients.admit(pending)
    assert outcome(clients.admit(FakeConnection("c"))) == tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED
    clients.forget(pending)
    assert clients.unlist(first)  # leaving: not routed to, still counted
    assert clients.holder("a") is None
    assert outcome(clients.admit(FakeConnection("c"))) is None
    assert outcome(clients.admit(FakeConnection("d"))) == tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED
    assert not clients.forget(first)  # no longer the listed one
    assert outcome(clients.admit(FakeConnection("d"))) is None


def test_a_live_holder_keeps_its_id():
    _, clients = table()
    holder = listed(clients, "twin")
    newcomer = FakeConnection("twin")
    decided = clients.admit(newcomer)
    assert outcome(decided) == "pending"
    assert outcome(clients.admit(FakeConnection("twin"))) == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    holder.session.pings[0].callback(0.001)
    assert outcome(decided) == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    assert clients.holder("twin") is holder and holder.departed is None
    assert outcome(clients.admit(FakeConnection("twin"))) == "pending"  # claim released


def test_a_silent_holder_is_replaced_after_the_ping_timeout():
    clock, clients = table(duplicate_ping_timeout=2.0)
    holder = listed(clients, "twin")
    decided = clients.admit(FakeConnection("twin"))
    clock.advance(1.9)
    assert outcome(decided) == "pending"
    clock.advance(0.1)
    assert outcome(decided) is None
    assert holder.departed == "replaced by a new connection" and holder.session.aborted


def test_in_a_cluster_the_id_is_claimed_there_too():
    claims = FakeClusterClaims()
    _, clients = table(cluster_claims=claims)
    connection = FakeConnection("edge")
    assert outcome(clients.admit(connection)) is None
    assert claims.claimed == ["edge"]
    clients.forget(connection)  # never admitted: the cluster claim is given back
    assert claims.released == ["edge"]


def test_an_admitted_client_leaves_its_cluster_claim_to_the_registry():
    claims = FakeClusterClaims()
    _, clients = table(cluster_claims=claims)
    connection = listed(clients, "edge")
    assert clients.forget(connection)
    assert claims.released == []


def test_a_cluster_refusal_frees_the_id_here():
    claims = FakeClusterClaims(
        HandshakeRejected(tunnel_pb2.Reject.CODE_ALREADY_EXISTS, "elsewhere"))
    _, clients = table(cluster_claims=claims)
    connection = FakeConnection("edge")
    assert outcome(clients.admit(connection)) == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    clients.forget(connection)
    assert claims.released == []  # nothing to give back
    assert outcome(clients.admit(FakeConnection("edge"))) == tunnel_pb2.Reject.CODE_ALREADY_EXISTS
    assert claims.claimed == ["edge", "edge"]  # asked again: not refused here
