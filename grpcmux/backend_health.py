"""Backend health: the client checks its gRPC server and tells the multiplexer.

Client side, :class:`BackendHealthChecker` keeps one HTTP/2 connection of its own
to the gRPC server and calls ``grpc.health.v1.Health`` (service ``""``) on it:
``Check`` every ``interval`` seconds, and ``Watch`` where offered, so that a change
is seen at once; a lost connection is retried at once, so a server that stops is
seen as down within a connection attempt.  A server without the health service
(UNIMPLEMENTED) counts as serving while it accepts connections and answers.
Changes go to the multiplexer on the control stream (``BackendHealth``), and
:meth:`BackendHealthChecker.guard` keeps the tunnel's streams off a gRPC server
address that turns out to be a grpcmux proxy endpoint: a call must never loop.

Why HTTP/2 by hand and not grpcio in a thread: the client splices bytes and runs
no grpcio; the first thing to read is the server's SETTINGS frame, where a grpcmux
proxy endpoint announces itself (``SETTINGS_GRPCMUX_PROXY``) and which a grpcio
channel never shows; and a protocol on the reactor needs no thread crossing and
tests with StringTransport and Clock.  It speaks what two health calls need: its
SETTINGS and ACKs, PING answers, window credit for what it reads, HEADERS and
CONTINUATION (hpack), DATA and RST_STREAM.

Server side, :class:`ReportedHealth` applies one connection's reports to the
registry at most once per ``MIN_REPORT_INTERVAL`` (the latest report wins), so a
flapping or hostile client costs a bounded number of registry updates.
"""

import struct

import hpack
from grpc_health.v1 import health_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from grpcmux import __version__
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.http2.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    FRAME_HEADER_LENGTH,
    PREFACE,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_GRPCMUX_PROXY,
    SETTINGS_HEADER_TABLE_SIZE,
    TYPE_CONTINUATION,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_PUSH_PROMISE,
    TYPE_RST_STREAM,
    TYPE_SETTINGS,
    TYPE_WINDOW_UPDATE,
    frame_header,
    parse_frame_header,
)
from grpcmux.registry import NOT_SERVING, SERVING, UNKNOWN

#: Seconds between two health checks of the gRPC server.
CHECK_INTERVAL = 5.0
#: Seconds a connection attempt or a Check may take before the server counts as down.
CHECK_TIMEOUT = 3.0
#: Seconds the multiplexer waits at least between two applied reports of one client.
MIN_REPORT_INTERVAL = 1.0
#: Characters of a report's detail the multiplexer keeps for its log.
MAX_DETAIL = 200

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
PROXY_ERROR = (
    "the gRPC server at {address} is a grpcmux proxy endpoint; "
    "point --grpc-server-address at your gRPC server"
)

# gRPC status codes this module acts on (grpc/status.h).
OK = 0
UNKNOWN_CODE = 2
PERMISSION_DENIED = 7
INTERNAL = 13
UNIMPLEMENTED = 12
UNAUTHENTICATED = 16
# Answers of a server that works but keeps its health service from us.
_NO_HEALTH_SERVICE = frozenset([UNIMPLEMENTED, UNAUTHENTICATED, PERMISSION_DENIED])

# Bounds on what the gRPC server may send: health answers are a few bytes.
_MAX_HEADER_BLOCK = 16 * 1024
_MAX_MESSAGE = 4 * 1024
_MAX_STREAM_ID = 2**31 - 1

_Status = health_pb2.HealthCheckResponse.ServingStatus
_FROM_SERVING_STATUS = {
    _Status.Value("SERVING"): SERVING,
    _Status.Value("NOT_SERVING"): NOT_SERVING,
    _Status.Value("SERVICE_UNKNOWN"): NOT_SERVING,
}
_Report = tunnel_pb2.BackendHealth
_TO_REPORT = {
    UNKNOWN: _Report.STATUS_UNKNOWN,
    SERVING: _Report.STATUS_SERVING,
    NOT_SERVING: _Report.STATUS_NOT_SERVING,
}
_FROM_REPORT = {value: health for health, value in _TO_REPORT.items()}
_SETTING = struct.Struct(">HL")
_GRPC_PREFIX = struct.Struct(">BL")
_EMPTY_REQUEST = _GRPC_PREFIX.pack(0, 0)  # HealthCheckRequest(service="") is empty


class _ProtocolError(Exception):
    """The gRPC server broke HTTP/2 (or gRPC framing); the connection is dropped."""


def _frame(frame_type, flags, stream_id, payload=b""):
    return frame_header(len(payload), frame_type, flags, stream_id) + payload


def _unpad(flags, payload):
    if not flags & FLAG_PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ProtocolError("bad padding")
    return payload[1:len(payload) - payload[0]]


class _Call:
    """One health call's answer: its messages, then its gRPC status."""

    def __init__(self, on_message, on_end):
        self._on_message = on_message
        self._on_end = on_end
        self._headers_seen = False
        self._http_status = None
        self._grpc_status = None
        self._grpc_message = ""
        self._buffer = bytearray()

    def headers(self, fields):
        for name, value in fields:
            if name == ":status":
                self._http_status = value
            elif name == "grpc-status":
                self._grpc_status = int(value) if value.isdigit() else UNKNOWN_CODE
            elif name == "grpc-message":
                self._grpc_message = value
        self._headers_seen = True

    def data(self, payload):
        self._buffer += payload
        while len(self._buffer) >= _GRPC_PREFIX.size:
            compressed, length = _GRPC_PREFIX.unpack_from(self._buffer)
            if compressed or length > _MAX_MESSAGE:
                raise _ProtocolError("a health answer is compressed or oversized")
            end = _GRPC_PREFIX.size + length
            if len(self._buffer) < end:
                return
            message = bytes(self._buffer[_GRPC_PREFIX.size:end])
            del self._buffer[:end]
            self._on_message(message)

    def ended(self):
        if self._http_status != "200":
            self._on_end(UNKNOWN_CODE, f"HTTP status {self._http_status}")
        elif self._grpc_status is None:
            self._on_end(INTERNAL, "the answer has no grpc-status")
        else:
            self._on_end(self._grpc_status, self._grpc_message)

    def reset(self, error_code):
        self._on_end(UNKNOWN_CODE, f"stream reset (HTTP/2 error {error_code})")


class _HealthConnection(Protocol):
    """One HTTP/2 connection to the gRPC server, for health calls only.

    Tells its owner ``settings_received(self, is_proxy)`` on the server's first
    SETTINGS frame, and ``connection_lost(self, problem)`` once it is gone
    (``problem``: why, when this side dropped it).
    """

    stopped = None  # a Deferred the owner waits on while stopping

    def __init__(self, owner, authority):
        self._owner = owner
        self._authority = authority
        self._buffer = bytearray()
        self._settings_seen = False
        self._calls = {}  # stream id -> _Call
        self._next_id = 1
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_BLOCK)
        self._continued = None  # (stream id, END_STREAM, block) while CONTINUATIONs come
        self.problem = None

    def connectionMade(self):
        enable_push = _SETTING.pack(SETTINGS_ENABLE_PUSH, 0)
        self.transport.write(PREFACE + _frame(TYPE_SETTINGS, 0, 0, enable_push))

    def call(self, method, on_message, on_end, timeout=None):
        """Start ``method`` (HealthCheckRequest for service ""); answers go to the callbacks.

        ``on_message(bytes)`` per answer message, ``on_end(code, message)`` at the
        end; neither after the connection is lost. Returns the stream id.
        """
        if self._next_id > _MAX_STREAM_ID:
            self.drop("stream ids used up")
            return None
        stream_id, self._next_id = self._next_id, self._next_id + 2
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self._authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", f"grpcmux-health/{__version__}"),
        ]
        if timeout is not None:
            fields.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        self._calls[stream_id] = _Call(on_message, on_end)
        self.transport.write(
            _frame(TYPE_HEADERS, FLAG_END_HEADERS, stream_id, self._encoder.encode(fields))
            + _frame(TYPE_DATA, FLAG_END_STREAM, stream_id, _EMPTY_REQUEST)
        )
        return stream_id

    def forget(self, stream_id):
        """Stop listening to a call (cancelling it on the server)."""
        if self._calls.pop(stream_id, None) is not None:
            self.transport.write(_frame(TYPE_RST_STREAM, 0, stream_id, struct.pack(">L", 8)))

    def drop(self, problem):
        """Close the connection now; ``problem`` is what the owner is told."""
        if self.problem is None:
            self.problem = problem
        self._calls.clear()
        self.transport.abortConnection()

    def dataReceived(self, data):
        self._buffer += data
        while self.problem is None and len(self._buffer) >= FRAME_HEADER_LENGTH:
            length, frame_type, flags, stream_id = parse_frame_header(self._buffer)
            if length > DEFAULT_MAX_FRAME_SIZE or (
                    not self._settings_seen and frame_type != TYPE_SETTINGS):
                self.drop("it does not answer as an HTTP/2 (gRPC) server"
                          if not self._settings_seen else "it sent an oversized frame")
                return
            end = FRAME_HEADER_LENGTH + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[FRAME_HEADER_LENGTH:end])
            del self._buffer[:end]
            try:
                self._frame_received(frame_type, flags, stream_id, payload)
            except (_ProtocolError, hpack.HPACKError) as error:
                self.drop(f"HTTP/2 protocol error: {error}")

    def _frame_received(self, frame_type, flags, stream_id, payload):
        if self._continued is not None and frame_type != TYPE_CONTINUATION:
            raise _ProtocolError("a header block was interrupted")
        if frame_type == TYPE_SETTINGS:
            self._settings(flags, stream_id, payload)
        elif frame_type == TYPE_HEADERS:
            payload = _unpad(flags, payload)
            if flags & FLAG_PRIORITY:
                payload = payload[5:]
            self._continued = (stream_id, bool(flags & FLAG_END_STREAM), bytearray())
            self._header_fragment(flags, stream_id, payload)
        elif frame_type == TYPE_CONTINUATION:
            if self._continued is None or self._continued[0] != stream_id:
                raise _ProtocolError("CONTINUATION without HEADERS")
            self._header_fragment(flags, stream_id, payload)
        elif frame_type == TYPE_DATA:
            self._data(flags, stream_id, payload)
        elif frame_type == TYPE_RST_STREAM:
            call = self._calls.pop(stream_id, None)
            if call is not None:
                call.reset(struct.unpack(">L", payload[:4])[0] if len(payload) == 4 else -1)
        elif frame_type == TYPE_PING:
            if not flags & FLAG_ACK:
                self.transport.write(_frame(TYPE_PING, FLAG_ACK, 0, payload))
        elif frame_type == TYPE_GOAWAY:
            self.drop("the gRPC server closed the connection (GOAWAY)")
        elif frame_type == TYPE_PUSH_PROMISE:
            raise _ProtocolError("server push, which was disabled")
        # WINDOW_UPDATE, PRIORITY and unknown types: nothing to do (our writes are tiny).

    def _settings(self, flags, stream_id, payload):
        if stream_id != 0 or len(payload) % _SETTING.size:
            raise _ProtocolError("malformed SETTINGS")
        if flags & FLAG_ACK:
            return
        settings = dict(_SETTING.iter_unpack(payload))
        if not self._settings_seen and settings.get(SETTINGS_GRPCMUX_PROXY) == 1:
            self._settings_seen = True
            self.problem = "it is a grpcmux proxy endpoint"
            self._owner.settings_received(self, is_proxy=True)
            self.transport.abortConnection()
            return
        if SETTINGS_HEADER_TABLE_SIZE in settings:
            self._encoder.header_table_size = settings[SETTINGS_HEADER_TABLE_SIZE]
        self.transport.write(_frame(TYPE_SETTINGS, FLAG_ACK, 0))
        if not self._settings_seen:
            self._settings_seen = True
            self._owner.settings_received(self, is_proxy=False)

    def _header_fragment(self, flags, stream_id, fragment):
        block = self._continued[2]
        block += fragment
        if len(block) > _MAX_HEADER_BLOCK:
            raise _ProtocolError("header block too large")
        if not flags & FLAG_END_HEADERS:
            return
        end_stream = self._continued[1]
        self._continued = None
        fields = self._decoder.decode(bytes(block))  # always: keeps hpack state in step
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.headers(fields)
        if end_stream:
            del self._calls[stream_id]
            call.ended()

    def _data(self, flags, stream_id, payload):
        if payload:  # give back the window at once: what we keep is tiny and bounded
            credit = struct.pack(">L", len(payload))
            self.transport.write(_frame(TYPE_WINDOW_UPDATE, 0, 0, credit))
            if stream_id in self._calls and not flags & FLAG_END_STREAM:
                self.transport.write(_frame(TYPE_WINDOW_UPDATE, 0, stream_id, credit))
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.data(_unpad(flags, payload))
        if flags & FLAG_END_STREAM and self._calls.pop(stream_id, None) is not None:
            call.ended()

    def connectionLost(self, reason=None):
        self._calls.clear()
        problem = self.problem
        if problem is None:
            problem = "the gRPC server closed the connection"
            if not self._settings_seen:
                problem = "it closed the connection before HTTP/2 settings"
        self._owner.connection_lost(self, problem)


def _serving_status(message):
    response = health_pb2.HealthCheckResponse()
    try:
        response.ParseFromString(message)
    except Exception:
        return NOT_SERVING, "its health answer is not a HealthCheckResponse"
    name = _Status.Name(response.status) if response.status in _Status.values() else "?"
    return _FROM_SERVING_STATUS.get(response.status, UNKNOWN), f"health status {name}"


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """The gRPC server's endpoint, closed while it is found to be a grpcmux proxy."""

    def __init__(self, checker, endpoint):
        self._checker = checker
        self._endpoint = endpoint

    def connect(self, factory):
        return self._checker.when_decided().addCallback(self._connect, factory)

    def _connect(self, _, factory):
        if self._checker.is_proxy:
            raise ConnectError(string=PROXY_ERROR.format(address=self._checker.address))
        return self._endpoint.connect(factory)


class BackendHealthChecker(Service):
    """Checks the gRPC server at ``address`` (through ``endpoint``) while running.

    ``health`` is UNKNOWN, SERVING or NOT_SERVING (``grpcmux.registry``);
    ``is_proxy`` is true while the address answers as a grpcmux proxy endpoint.
    """

    _log = Logger()

    def __init__(self, clock, endpoint, address, interval=CHECK_INTERVAL,
                 timeout=CHECK_TIMEOUT):
        self._clock = clock
        self._endpoint = endpoint
        self.address = address
        self.interval = interval
        self.timeout = timeout
        self.health = UNKNOWN
        self.detail = ""
        self.is_proxy = False
        self._loop = None
        self._protocol = None  # the connection, from connect to loss
        self._connecting = None
        self._ready = False
        self._connected_at = None
        self._timer = None  # connect/settings or Check deadline
        self._check_id = None
        self._watch_id = None
        self._watch_offered = True
        self._check_answer = None
        self._decided = False  # the first attempt has told what the address is
        self._waiters = []
        self._control = None
        self._observers = []

    # what the client uses

    def guard(self, endpoint):
        """``endpoint`` (the gRPC server's), refusing to connect to a grpcmux proxy.

        Connections wait until the first check has seen what answers there.
        """
        return _GuardedEndpoint(self, endpoint)

    def when_decided(self):
        """Fires once the first check has told whether the address is a proxy."""
        if self._decided or not self.running:
            return succeed(None)
        waiter = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def welcomed(self, welcome, control):
        """Report on ``control`` (a welcomed NativeClientHandshake) from now on.

        For ``control.result.addCallback``: passes ``welcome`` through.
        """
        self._control = control
        if self.health != UNKNOWN:
            control.report_backend_health(_TO_REPORT[self.health], self.detail)
        return welcome

    def add_health_observer(self, observer):
        """Call ``observer(health, detail)`` at each change of ``health``; returns a remover."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    # service

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cancel_timer()
        self._decide()
        protocol, self._protocol = self._protocol, None  # first: what follows is ours
        if self._connecting is not None:
            self._connecting.cancel()
        if protocol is None or protocol.transport is None:
            return None
        closed = Deferred()
        protocol.stopped = closed
        protocol.drop("stopping")
        return closed

    def check(self):
        """Check now: a Check call on the connection, or a new connection."""
        if self._protocol is None:
            self._connect()
        elif self._ready and self._check_id is None:
            self._start_check()

    # the connection

    def _connect(self):
        # A UNIX socket has no host to name; grpcio clients say "localhost" there too.
        authority = "localhost" if self.address.startswith("unix:") else self.address
        protocol = _HealthConnection(self, authority)
        self._protocol = protocol
        self._ready = False
        self._arm(self._timed_out, protocol, "no HTTP/2 settings")
        self._connecting = connectProtocol(self._endpoint, protocol)
        self._connecting.addCallbacks(self._connected, self._connect_failed,
                                      errbackArgs=(protocol,))

    def _connected(self, protocol):
        self._connecting = None
        self._connected_at = self._clock.seconds()

    def _connect_failed(self, failure, protocol):
        self._connecting = None
        if protocol is self._protocol:
            self._protocol = None
            self._cancel_timer()
            self._down(f"cannot connect: {failure.getErrorMessage()}")
            self._decide()

    def settings_received(self, protocol, is_proxy):
        if protocol is not self._protocol:
            return
        if is_proxy:
            self._protocol = None
            self._cancel_timer()
            self._proxy_found()
            self._decide()
            return
        if self.is_proxy:
            self.is_proxy = False
            self._log.info("the gRPC server at {address} is no longer a grpcmux proxy "
                           "endpoint", address=self.address)
        self._cancel_timer()
        self._ready = True
        self._watch_offered = True
        self._decide()
        self._start_check()

    def connection_lost(self, protocol, problem):
        stopped = getattr(protocol, "stopped", None)
        if stopped is not None:
            stopped.callback(None)
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._cancel_timer()
        self._check_id = self._watch_id = None
        was_ready, self._ready = self._ready, False
        lived = self._clock.seconds() - (self._connected_at or 0)
        if was_ready and lived >= self.interval:
            self._connect()  # a long-lived connection ended: look again at once
            return
        self._down(problem)
        self._decide()

    def _timed_out(self, protocol, what):
        self._timer = None
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._check_id = self._watch_id = None
        self._down(f"{what} within {self.timeout:g} s")
        self._decide()
        if self._connecting is not None:
            self._connecting.cancel()
        else:
            protocol.drop("timed out")

    # the calls

    def _start_check(self):
        protocol = self._protocol
        self._check_answer = None
        self._check_id = protocol.call(CHECK, self._check_answered,
                                       lambda code, message: self._check_ended(
                                           protocol, code, message),
                                       timeout=self.timeout)
        if self._check_id is not None:
            self._arm(self._timed_out, protocol, "no answer to a health check")

    def _check_answered(self, message):
        self._check_answer = message

    def _check_ended(self, protocol, code, message):
        self._check_id = None
        self._cancel_timer()
        if code == OK and self._check_answer is not None:
            self._set(*_serving_status(self._check_answer))
            if self._watch_id is None and self._watch_offered:
                self._watch_id = protocol.call(WATCH, self._watched, self._watch_ended)
        elif code in _NO_HEALTH_SERVICE:
            self._set(SERVING, "it accepts connections (no health service)")
        else:
            self._set(NOT_SERVING, f"health check failed: code {code}: {message}")

    def _watched(self, message):
        self._set(*_serving_status(message))

    def _watch_ended(self, code, message):
        self._watch_id = None
        if code == UNIMPLEMENTED:
            self._watch_offered = False  # Check alone then, on this connection

    # state

    def _arm(self, fn, *args):
        self._cancel_timer()
        self._timer = self._clock.callLater(self.timeout, fn, *args)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _decide(self):
        self._decided = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _down(self, detail):
        self._set(NOT_SERVING, detail)

    def _proxy_found(self):
        if not self.is_proxy:
            self.is_proxy = True
            self._log.error(PROXY_ERROR, address=self.address)
        self._set(NOT_SERVING, "it is a grpcmux proxy endpoint", quiet=True)

    def _set(self, health, detail, quiet=False):
        changed = health != self.health
        self.health, self.detail = health, detail
        if not changed:
            return
        if quiet:
            pass
        elif health == SERVING:
            self._log.info("gRPC server {address} is serving ({detail})",
                           address=self.address, detail=detail)
        elif health == NOT_SERVING:
            self._log.warn("gRPC server {address} is down: {detail}",
                           address=self.address, detail=detail)
        else:
            self._log.info("gRPC server {address} reports its health as unknown",
                           address=self.address)
        if self._control is not None:
            self._control.report_backend_health(_TO_REPORT[health], detail)
        for observer in list(self._observers):
            observer(health, detail)


class ReportedHealth:
    """One client connection's health reports, applied at a bounded rate.

    ``apply(health, detail)`` runs on the clock's thread at most once per
    ``min_interval`` seconds with the latest report; ``stop()`` drops a pending one.
    """

    def __init__(self, clock, apply, min_interval=MIN_REPORT_INTERVAL):
        self._clock = clock
        self._apply = apply
        self._min_interval = min_interval
        self._pending = None
        self._timer = None
        self._last = None

    def received(self, message):
        """A ``ClientMessage`` from the control stream; kinds other than health are ignored."""
        if message.WhichOneof("kind") != "backend_health":
            return
        report = message.backend_health
        self._pending = (_FROM_REPORT.get(report.status, UNKNOWN), report.detail[:MAX_DETAIL])
        if self._timer is not None:
            return  # applied when the timer fires, as the latest
        wait = 0.0 if self._last is None else self._last + self._min_interval - self._clock.seconds()
        if wait > 0:
            self._timer = self._clock.callLater(wait, self._apply_pending)
        else:
            self._apply_pending()

    def _apply_pending(self):
        self._timer = None
        self._last = self._clock.seconds()
        pending, self._pending = self._pending, None
        self._apply(*pending)

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pending = None


_server_log = Logger(namespace="grpcmux.backend_health")


def record_health(registry, client_id, health, detail):
    """Put a client's reported health in the registry, logging a change."""
    info = registry.get(client_id)
    if info is None or info.health == health:
        return
    registry.update(client_id, health=health)
    if health == NOT_SERVING:
        _server_log.warn("client {client_id} reports its gRPC server down: {detail!r}",
                         client_id=client_id, detail=detail)
    else:
        _server_log.info("client {client_id} reports its gRPC server {health}",
                         client_id=client_id, health=health)
