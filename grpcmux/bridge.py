"""A private UNIX socket per connected client, each connection spliced to a new stream.

The proxy thread reaches client X through a gRPC channel to ``unix:<path>``; every
connection that channel makes is accepted here on the reactor and joined to a fresh
yamux stream opened towards X (on the outer session for native clients, on the
nested one for legacy clients), so HTTP/2 bytes flow untouched end to end.
"""

from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from grpcmux.splice import SpliceProtocol, splice
from grpcmux.yamux.errors import YamuxError
from grpcmux.tuning import tune_transport


class _BridgeFactory(Factory):
    noisy = False

    def __init__(self, bridge):
        self._bridge = bridge

    def buildProtocol(self, addr):
        return _SocketEnd(self._bridge)


class _SocketEnd(SpliceProtocol):
    """The proxy's side of one bridged connection; opens its stream on connect."""

    def __init__(self, bridge):
        self._bridge = bridge

    def connectionMade(self):
        super().connectionMade()
        self._bridge.connection_made(self)

    def connectionLost(self, reason=None):
        self._bridge.connection_lost(self)
        super().connectionLost(reason)


class Bridge:
    """Listens on ``socket_path`` and ties each accepted connection to a new stream.

    ``session`` is the yamux session whose ``open_stream`` reaches the client.
    """

    _log = Logger()

    def __init__(self, reactor, socket_path, session, client_id):
        self._reactor = reactor
        self.socket_path = socket_path
        self._session = session
        self._client_id = client_id
        self._port = None
        self._connections = set()

    def start(self):
        """Listen now (synchronously): the socket exists when this returns."""
        self._port = self._reactor.listenUNIX(
            self.socket_path, _BridgeFactory(self), mode=0o600, wantPID=False
        )

    def stop(self):
        """Stop listening (which removes the socket file) and drop every connection."""
        for connection in list(self._connections):
            connection.abort()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        # A port whose listening already ended answers None rather than a Deferred.
        return maybeDeferred(port.stopListening)

    @property
    def active_connections(self):
        return len(self._connections)

    def connection_made(self, socket_end):
        self._connections.add(socket_end)
        stream_end = SpliceProtocol()
        try:
            self._session.open_stream(stream_end)
        except YamuxError as error:
            self._log.warn(
                "cannot open a stream to client {client_id}: {error}",
                client_id=self._client_id,
                error=error,
            )
            socket_end.abort()
            return
        tune_transport(socket_end.transport)
        splice(socket_end, stream_end)

    def connection_lost(self, socket_end):
        self._connections.discard(socket_end)
