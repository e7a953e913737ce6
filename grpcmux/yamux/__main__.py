"""Command-line yamux peer, the Python twin of tests/interop/yamuxpeer (Go).

    python -m grpcmux.yamux echo  --listen HOST:PORT  --role server|client
                                  [--window N] [--nested] [--hold] [--goaway]
    python -m grpcmux.yamux drive --connect HOST:PORT --role client|server
                                  --streams N --bytes M [--window N] [--nested]
                                  [--expect-goaway] [--timeout SECONDS]

echo prints its bound address as the first stdout line, accepts one TCP
connection and echoes every stream the peer opens (writing back what it reads,
FIN after the peer's FIN; with --hold only after the peer's FIN) until the
session ends. --goaway sends GoAway once the first stream is accepted.

drive opens the streams at once, sends M bytes of a seeded pseudo-random
pattern on each (the Go peer's drive sends the same kind of pattern),
half-closes, verifies the echo byte for byte and the echo's FIN, pings and
prints one JSON line {"streams_ok", "bytes", "seconds", "mb_per_s", "rtt_ms"}
(MB = 10**6 bytes of payload sent per second); exit 0 only if all matched.
--expect-goaway then requires that opening one more stream is refused.

--nested runs an inner yamux session, roles swapped as in the legacy
grpc-multiplexer handshake, over the first outer stream (opened by drive);
the streams are then opened on the inner session.

Both modes send DATA frames as large as the window (as Go does), use big
TCP buffers (grpcmux.tuning.tune_transport, as the server and client use)
and take received data as memoryviews (YamuxStream.deliver_views; the echo
writes them back, the drive compares them: neither needs a copy): they exist
to be measured against the Go peer.

Bad arguments, a refused connection or an unusable listen address: one line on
stderr and exit 2.
"""

import argparse
import json
import random
import sys
import time

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from ..malloc import tune_malloc
from ..tuning import tune_transport
from .config import YamuxConfig
from .errors import GoAwayReceived, ProtocolError, RemoteGoAwayError, YamuxConfigError
from .session import YamuxSession

_CHUNK = 256 * 1024  # driver write size
USAGE_EXIT = 2


class UsageError(Exception):
    """A bad command line or an unusable address: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as an exception instead of a usage block."""

    def error(self, message):
        raise UsageError(message)


def _address(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
    return value


def build_parser():
    """The argument parser (shared flags with the Go peer)."""
    parser = _Parser(prog="python -m grpcmux.yamux", description="yamux echo/drive peer")
    modes = parser.add_subparsers(dest="mode", required=True)
    echo = modes.add_parser("echo", help="echo every stream of one connection")
    echo.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    echo.add_argument("--role", choices=("server", "client"), default="server")
    echo.add_argument("--hold", action="store_true",
                      help="echo only after the peer's FIN")
    echo.add_argument("--goaway", action="store_true",
                      help="send GoAway after accepting the first stream")
    drive = modes.add_parser("drive", help="open streams, verify their echo, ping")
    drive.add_argument("--connect", type=_address, required=True)
    drive.add_argument("--role", choices=("client", "server"), default="client")
    drive.add_argument("--streams", type=_positive, default=1)
    drive.add_argument("--bytes", type=_non_negative, default=1024 * 1024)
    drive.add_argument("--expect-goaway", action="store_true")
    drive.add_argument("--timeout", type=float, default=120.0)
    for sub in (echo, drive):
        sub.add_argument("--window", type=_positive, default=256 * 1024,
                         help="max stream window size in bytes")
        sub.add_argument("--nested", action="store_true",
                         help="work on an inner session carried by the first stream")
    return parser


# -- echo --------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class EchoProtocol(Protocol):
    """Writes back what it reads; FIN after the peer's FIN.

    The stream is registered as its own producer, so while the echo cannot be
    sent (peer's window spent) reading pauses and the peer's window closes.
    """

    def __init__(self, hold, on_first_stream):
        self._hold = hold
        self._held = []
        self._on_first_stream = on_first_stream

    def connectionMade(self):
        if self._on_first_stream is not None:
            self._on_first_stream(self.transport.session)
        self.transport.deliver_views = True  # echoed as they are: no copy needed
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data):
        if self._hold:
            self._held.append(data)
        else:
            self.transport.write(data)

    def readConnectionLost(self):
        if self._held:
            self.transport.writeSequence(self._held)
            self._held = []
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class EchoFactory(Factory):
    """Builds an EchoProtocol per stream; optionally GoAway after the first one."""

    def __init__(self, hold, go_away):
        self._hold = hold
        self._go_away = go_away
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        first = self.accepted == 1 and self._go_away
        return EchoProtocol(self._hold, (lambda session: session.go_away()) if first else None)


class CarrierFactory(Factory):
    """Turns the first stream into the carrier of an inner session; resets others."""

    def __init__(self, make_inner):
        self._make_inner = make_inner
        self.inner = None

    def buildProtocol(self, addr):
        if self.inner is not None:
            return None
        self.inner = self._make_inner()
        return self.inner


class _OneConnection(Factory):
    """Builds a single session for the first TCP connection; refuses the rest."""

    def __init__(self, make_session):
        self._make_session = make_session
        self.session = None
        self.connected = defer.Deferred()

    def buildProtocol(self, addr):
        if self.session is not None:
            return None
        self.session = self._make_session()
        self.connected.callback(self.session)
        return self.session


def _exit_code_for(reason):
    """0 for an ordinary end of the session, 1 for a protocol failure."""
    if isinstance(reason, (ProtocolError, RemoteGoAwayError)):
        print(f"yamux session failed: {reason}", file=sys.stderr)
        return 1
    return 0


@defer.inlineCallbacks
def run_echo(reactor, args, config):
    """Listen, serve one connection, return the exit code when its session ends."""
    is_client = args.role == "client"
    echo_factory = EchoFactory(args.hold, args.goaway)
    if args.nested:
        stream_factory = CarrierFactory(
            lambda: YamuxSession(not is_client, echo_factory, config, reactor))
    else:
        stream_factory = echo_factory
    connection = _OneConnection(
        lambda: YamuxSession(is_client, stream_factory, config, reactor, tune_transport))
    host, port = args.listen
    try:
        listening = yield TCP4ServerEndpoint(reactor, port, interface=host).listen(connection)
    except error.CannotListenError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.socketError}") from None
    bound = listening.getHost()
    print(f"{bound.host}:{bound.port}", flush=True)
    session = yield connection.connected
    yield listening.stopListening()
    reason = yield session.when_closed()
    return _exit_code_for(reason)


# -- drive -------------------------------------------------------------------


# The payload: one pseudo-random block, repeated; each stream starts at its own
# seed-derived offset.  The block length is odd and not a multiple of any frame
# or read size, so a lost, repeated or misdirected piece shows up as a
# mismatch (only a shift by an exact multiple of the block length could not),
# and every send is a view into one bytes object and every check a memcmp.
_BLOCK_SIZE = 1024 * 1024 + 7
_pattern_cache = []


def _pattern():
    """The block followed by its own first _CHUNK bytes (wrap-free slices)."""
    if not _pattern_cache:
        block = random.Random(0x79616D7578).randbytes(_BLOCK_SIZE)
        _pattern_cache.append(block + block[:_CHUNK])
    return _pattern_cache[0]


def _start_offset(seed):
    """Where stream ``seed`` starts within the block (distinct for nearby seeds)."""
    return (seed * 104_729) % _BLOCK_SIZE


class _PatternReader:
    """Compares arbitrary slices with the stream's expected bytes, chunk by chunk."""

    def __init__(self, seed):
        self._pattern = _pattern()
        self._offset = _start_offset(seed)

    def matches(self, data):
        pattern = self._pattern
        offset = self._offset
        start = 0
        size = len(data)
        while start < size:
            take = min(size - start, len(pattern) - offset)
            piece = data if take == size else data[start:start + take]
            if not pattern.startswith(piece, offset):  # memcmp, no copy of the pattern
                return False
            start += take
            offset += take
            if offset >= _BLOCK_SIZE:
                offset -= _BLOCK_SIZE
        self._offset = offset
        return True


@implementer(IHalfCloseableProtocol, IPushProducer)
class DriveProtocol(Protocol):
    """Sends ``size`` seeded bytes, half-closes, verifies the echo and its FIN.

    ``done`` fires with None on success or with a one-line error message.
    """

    def __init__(self, seed, size):
        self._size = size
        self._pattern = memoryview(_pattern())  # writes are views: no copy, as in Go
        self._offset = _start_offset(seed)
        self._expected = _PatternReader(seed)
        self._sent = 0
        self._received = 0
        self._paused = False
        self._error = None
        self._echo_finished = False
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.deliver_views = True  # only compared: no copy needed
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    # IPushProducer: write while the stream takes it.
    def resumeProducing(self):
        self._paused = False
        while not self._paused and self._sent < self._size and self.transport.connected:
            size = min(_CHUNK, self._size - self._sent)
            offset = self._offset
            chunk = self._pattern[offset:offset + size]
            offset += size
            self._offset = offset - _BLOCK_SIZE if offset >= _BLOCK_SIZE else offset
            self._sent += size
            self.transport.write(chunk)
        if self._sent == self._size and self.transport.producer is self:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def pauseProducing(self):
        self._paused = True

    def stopProducing(self):
        self._paused = True

    def dataReceived(self, data):
        if self._error is not None:
            return
        self._received += len(data)
        if self._received > self._size:
            self._fail(f"{self._received - self._size} bytes more than sent")
        elif not self._expected.matches(data):
            self._fail(f"echo differs within bytes {self._received - len(data)}"
                       f"..{self._received}")

    def readConnectionLost(self):
        self._echo_finished = True
        if self._received != self._size and self._error is None:
            self._error = f"echo ended after {self._received} of {self._size} bytes"

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        stream_id = self.transport.stream_id
        if self._error is None and not self._echo_finished:
            self._error = f"stream ended without the echo's FIN: {reason.value!r}"
        if self._error is None and not reason.check(error.ConnectionDone):
            self._error = f"stream ended with {reason.value!r}"
        self.done.callback(None if self._error is None else f"stream {stream_id}: {self._error}")

    def _fail(self, message):
        self._error = message
        self.transport.abortConnection()


@defer.inlineCallbacks
def run_drive(reactor, args, config):
    """Connect, drive the streams, print the JSON line and return the exit code."""
    is_client = args.role == "client"
    endpoint = TCP4ClientEndpoint(reactor, *args.connect, timeout=10)
    factory = Factory.forProtocol(
        lambda: YamuxSession(is_client, None, config, reactor, tune_transport))
    try:
        outer = yield endpoint.connect(factory)
    except Exception as exc:  # refused, unreachable, unresolvable, timed out
        host, port = args.connect
        raise UsageError(f"cannot connect to {host}:{port}: {exc}") from None
    work = outer
    if args.nested:
        work = YamuxSession(not is_client, None, config, reactor)
        outer.open_stream(work)

    result = {"streams_ok": 0, "bytes": args.streams * args.bytes, "seconds": 0.0,
              "mb_per_s": 0.0, "rtt_ms": 0.0}
    errors = []
    started = time.perf_counter()
    drivers = [DriveProtocol(seed, args.bytes) for seed in range(1, args.streams + 1)]
    for driver in drivers:
        work.open_stream(driver)
    outcomes = yield _with_timeout(
        reactor, defer.gatherResults([d.done for d in drivers], consumeErrors=True), args.timeout,
        "streams did not finish")
    elapsed = time.perf_counter() - started
    if isinstance(outcomes, str):
        errors.append(outcomes)
    else:
        errors.extend(message for message in outcomes if message is not None)
        result["streams_ok"] = outcomes.count(None)
    result["seconds"] = elapsed
    if elapsed > 0:
        result["mb_per_s"] = result["bytes"] / 1e6 / elapsed

    if not errors and args.expect_goaway:
        try:
            work.open_stream(Protocol())
        except GoAwayReceived:
            result["goaway"] = True
        else:
            result["goaway"] = False
            errors.append("the peer's GoAway did not refuse a new stream")
    if not errors:
        rtt = yield _with_timeout(reactor, work.ping(), config.connection_write_timeout + 1,
                                  "ping not answered")
        if isinstance(rtt, str):
            errors.append(rtt)
        else:
            result["rtt_ms"] = rtt * 1000
    print(json.dumps(result), flush=True)
    for message in errors:
        print(message, file=sys.stderr)
    closed = outer.when_closed()
    if work is not outer:
        work.close()
    outer.close()
    yield closed
    return 0 if not errors else 1


def _with_timeout(reactor, deferred, seconds, message):
    """``deferred``'s result, or ``message`` (and the Deferred cancelled) after ``seconds``;
    a failure becomes its one-line description."""
    deferred.addTimeout(seconds, reactor)
    deferred.addErrback(
        lambda failure: message if failure.check(defer.TimeoutError, defer.CancelledError)
        else failure.getErrorMessage())
    return deferred


# -- entry point -------------------------------------------------------------


def main(argv=None):
    """Run the CLI on the global reactor; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        # DATA frames as large as the window, as the Go peer sends them (the
        # library's default of one default window bounds a turn of the scheduler).
        config = YamuxConfig(max_stream_window_size=args.window, max_frame_size=args.window)
    except (UsageError, YamuxConfigError) as exc:
        print(f"python -m grpcmux.yamux: error: {exc}", file=sys.stderr)
        return USAGE_EXIT

    from twisted.internet import reactor

    tune_malloc()
    outcome = []
    run = run_echo if args.mode == "echo" else run_drive

    def finished(result):
        outcome.append(result)
        reactor.stop()

    def failed(failure):
        if failure.check(UsageError):
            print(f"python -m grpcmux.yamux: error: {failure.value}", file=sys.stderr)
            outcome.append(USAGE_EXIT)
        else:
            print(f"python -m grpcmux.yamux: {failure.getErrorMessage()}", file=sys.stderr)
            outcome.append(1)
        reactor.stop()

    reactor.callWhenRunning(lambda: run(reactor, args, config).addCallbacks(finished, failed))
    reactor.run()
    return outcome[0] if outcome else 1


if __name__ == "__main__":
    sys.exit(main())
