"""Upstreams: HTTP/2 client connections the router opens to where calls go.

An :class:`UpstreamPool` keeps the connections to one *target* and hands each call
a stream on one of them: it honours the peer's SETTINGS_MAX_CONCURRENT_STREAMS
(calls wait for a free stream, or another connection is opened), stops using a
connection that received GOAWAY or is near the end of its stream ids, and drains
connections when the target goes away.

A target says how to reach it and how to explain a failure::

    target.label                      # metrics label: a client id, "" for local
    target.connect(factory)           # Deferred firing with the connected protocol
    target.failure(connection, reason)  # (grpc code, message) for calls it cut

Three kinds exist or will: a connected client's tunnel (a yamux stream per
connection), the local grpcio services (a private UNIX socket), another node of a
cluster (TCP/TLS).
"""

from collections import deque

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from grpcmux.tuning import tune_transport

from .connection import H2Connection


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool):
        self._pool = pool

    def buildProtocol(self, addr):
        return self._pool.new_connection()


class UpstreamPool:
    """Connections to one target, opened on demand, at most ``max_connections``."""

    _log = Logger()

    def __init__(self, target, config, clock, budget=None, max_connections=4):
        self.target = target
        self._config = config
        self._clock = clock
        self._budget = budget
        self._max_connections = max_connections
        self.connections = []  # connected H2Connections, oldest first
        self._connecting = 0
        self._waiting = deque()  # calls waiting for a stream
        self.retiring = False
        self.closed = False
        self._factory = _ConnectionFactory(self)

    def __repr__(self):
        return f"<UpstreamPool {self.describe()}>"

    def describe(self):
        name = getattr(self.target, "name", None)
        if name is not None:
            return f"grpcmux node {name}"
        label = self.target.label
        return f"client {label}" if label else "the local services"

    def request(self, call):
        """Give ``call`` a stream now (``call.upstream_opened(connection)``) or soon."""
        if self.closed:
            call.upstream_failed(*self.target.failure(None, None))
            return
        connection = self._usable()
        if connection is not None:
            call.upstream_opened(connection)
            return
        self._waiting.append(call)
        self._grow()

    def cancel(self, call):
        """``call`` no longer wants a stream (its caller left first)."""
        try:
            self._waiting.remove(call)
        except ValueError:
            pass

    @property
    def idle(self):
        return not self._waiting and not any(c.streams for c in self.connections)

    def _usable(self):
        for connection in self.connections:
            if connection.can_open_stream():
                return connection
        return None

    def _grow(self):
        if self._connecting or len(self.connections) >= self._max_connections:
            return
        self._connecting += 1
        d = self.target.connect(self._factory)
        d.addCallbacks(self._connected, self._connect_failed)

    def new_connection(self):
        connection = H2Connection(self._config, self._clock, is_client=True, budget=self._budget)
        connection.on_made = self._made
        connection.on_capacity = self._serve_waiting
        connection.on_settings = self._serve_waiting
        connection.on_closed = lambda reason: self._lost(connection, reason)
        return connection

    @staticmethod
    def _made(connection):
        tune_transport(connection.transport)

    def _connected(self, connection):
        self._connecting -= 1
        if connection.closed:
            return  # _lost already dealt with it
        self.connections.append(connection)
        if self.closed:
            connection.drain()
            return
        self._serve_waiting(connection)

    def _connect_failed(self, failure):
        self._connecting -= 1
        self._log.info("cannot open a connection to {upstream}: {reason}",
                       upstream=self.describe(), reason=failure.value)
        code, message = self.target.failure(None, failure.value)
        self._fail_waiting(code, message)

    def _serve_waiting(self, connection):
        waiting = self._waiting
        while waiting and connection.can_open_stream():
            waiting.popleft().upstream_opened(connection)
        if waiting:
            self._grow()
        elif self.retiring and self.idle:
            self.close()

    def _lost(self, connection, reason):
        if connection in self.connections:
            self.connections.remove(connection)
        if not self._waiting:
            return
        if connection.settings_received and not self.closed:
            self._grow()  # it worked before: try a fresh connection for the waiting
        else:
            code, message = self.target.failure(connection, reason)
            self._fail_waiting(code, message)

    def _fail_waiting(self, code, message):
        waiting, self._waiting = self._waiting, deque()
        for call in waiting:
            call.upstream_failed(code, message)

    def retire(self):
        """The target is leaving: no new calls; close once the calls in flight end."""
        self.retiring = True
        if self.idle:
            self.close()
        else:
            for connection in self.connections:
                connection.go_away()

    def close(self, abort=False):
        """Fail waiting calls and drain every connection (``abort``: cut them, and
        the calls on them fail as the target says)."""
        if self.closed:
            return
        self.closed = True
        self._fail_waiting(*self.target.failure(None, None))
        for connection in list(self.connections):
            if abort:
                connection.abort()
            else:
                connection.drain()

