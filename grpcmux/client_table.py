"""Which connection holds which client id, and who may take one.

A newcomer's hello is decided here: a well-formed id, the admission policy
(:mod:`grpcmux.admission`), the ``max_clients`` bound, and one holder per id.
While a decision is pending the id is claimed by that connection, so two newcomers
with one id cannot both get in.  When the id is held already the holder is pinged
(the duplicate-id challenge): a live one keeps the id, a dead one is replaced.  In
a cluster the id is claimed cluster-wide as well, once it is won here.
"""

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger

from grpcmux import tls
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import HandshakeRejected
from grpcmux.ids import client_id_problem


class ClientTable:
    """The ids of one multiplexer endpoint: pending claims, admitted connections, and
    the listed one per id.

    ``settings`` give ``max_clients`` and ``duplicate_ping_timeout``; ``admission``
    is the :class:`~grpcmux.admission.Admission` policy; ``cluster_claims``, in a
    cluster, has ``claim(id) -> Deferred`` and ``release(id)``. A connection is
    what :class:`~grpcmux.client_connection.ClientConnection` is: ``client_id``,
    ``hello``, ``session``, ``remote_address``, ``admitted`` and ``depart(reason)``.
    """

    _log = Logger()

    def __init__(self, clock, settings, admission, cluster_claims=None):
        self._clock = clock
        self._max_clients = settings.max_clients
        self._ping_timeout = settings.duplicate_ping_timeout
        self.admission = admission
        self.cluster_claims = cluster_claims
        self._pending = {}  # client id -> the connection whose hello is being decided
        self._cluster_claimed = set()  # claimed cluster-wide, not necessarily admitted
        self._admitted = set()  # counted against max_clients until their session closes
        self._listed = {}  # client id -> the connection calls are routed to

    def admit(self, connection):
        """Decide on a connection's hello: a Deferred that fails with
        ``HandshakeRejected`` to refuse it."""
        client_id = connection.client_id
        problem = client_id_problem(client_id)
        if problem is not None:
            return fail(HandshakeRejected(tunnel_pb2.Reject.CODE_BAD_CLIENT_ID, problem))
        refusal = self.admission.refusal(
            connection.hello, tls.peer_names(connection.session.transport))
        if refusal is not None:
            return fail(refusal)
        if client_id in self._pending:
            return fail(_already_connected(client_id))
        holder = self._listed.get(client_id)
        if holder is None and len(self._admitted) + len(self._pending) >= self._max_clients:
            return fail(HandshakeRejected(
                tunnel_pb2.Reject.CODE_RESOURCE_EXHAUSTED,
                f"the server has its maximum of {self._max_clients} clients connected; "
                "try again later or another server",
            ))
        self._pending[client_id] = connection
        decided = succeed(None) if holder is None else self._challenge(holder, connection)
        if self.cluster_claims is not None:
            decided.addCallback(lambda _: self._claim_in_cluster(connection))
        return decided

    def _claim_in_cluster(self, connection):
        """Claim the id cluster-wide too (a live holder on another node keeps it)."""
        self._cluster_claimed.add(connection)
        d = self.cluster_claims.claim(connection.client_id)
        d.addErrback(self._refused_in_cluster, connection)
        return d

    def _refused_in_cluster(self, failure, connection):
        self._cluster_claimed.discard(connection)
        self._release(connection)
        return failure

    def _challenge(self, holder, newcomer):
        """Ping the current holder of an id: a live one keeps it, a dead one is replaced."""
        client_id = newcomer.client_id
        pinged = holder.session.ping()
        pinged.addTimeout(self._ping_timeout, self._clock)

        def alive(_):
            self._release(newcomer)
            raise _already_connected(client_id)

        def dead(failure):
            self._log.info(
                "client {client_id} reconnected; replacing its unresponsive session "
                "from {remote_address}",
                client_id=client_id,
                remote_address=holder.remote_address,
            )
            holder.depart("replaced by a new connection")
            holder.session.abort()

        return pinged.addCallbacks(alive, dead)

    def _release(self, connection):
        if self._pending.get(connection.client_id) is connection:
            del self._pending[connection.client_id]

    def list(self, connection):
        """``connection`` is admitted: calls for its id go to it from now on."""
        self._release(connection)
        self._listed[connection.client_id] = connection
        self._admitted.add(connection)

    def holder(self, client_id):
        """The listed connection of ``client_id``, or None."""
        return self._listed.get(client_id)

    def is_listed(self, connection):
        """Whether ``connection`` is the one listed for its id."""
        return self._listed.get(connection.client_id) is connection

    def unlist(self, connection):
        """Stop routing to ``connection`` (it still counts against max_clients);
        True if it was the listed one."""
        if self.is_listed(connection):
            del self._listed[connection.client_id]
            return True
        return False

    def forget(self, connection):
        """``connection`` is gone: drop its claims; True if it was the listed one."""
        self._admitted.discard(connection)
        client_id = connection.client_id
        if client_id is None:
            return False
        self._release(connection)
        if connection in self._cluster_claimed and not connection.admitted:
            self._cluster_claimed.discard(connection)
            self.cluster_claims.release(client_id)
        return connection.admitted and self.unlist(connection)

    @property
    def listed(self):
        """Client id -> listed connection, a copy."""
        return dict(self._listed)


def _already_connected(client_id):
    return HandshakeRejected(
        tunnel_pb2.Reject.CODE_ALREADY_EXISTS,
        f"client id {client_id!r} is already connected; pick another id "
        "or stop the other client",
    )
