"""Tests for grpcmux.yamux.__main__: the echo/drive CLI.

In memory (iosim + task.Clock) for the protocols; subprocesses for the command
line itself (Python<->Python over loopback, exit codes, one-line errors).
The Go interop runs live in tests/interop/test_yamux_interop.py.
"""

import json
import select
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from grpcmux.testing import connected_sessions
from grpcmux.yamux import YamuxConfig, YamuxSession
from grpcmux.yamux.__main__ import (
    CarrierFactory,
    DriveProtocol,
    EchoFactory,
    UsageError,
    _pattern,
    _PatternReader,
    _start_offset,
    build_parser,
    main,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def drive(pair, streams, size, session=None):
    drivers = [DriveProtocol(seed, size) for seed in range(1, streams + 1)]
    for driver in drivers:
        (session or pair.client).open_stream(driver)
    pair.flush()
    results = []
    for driver in drivers:
        driver.done.addCallback(results.append)
    return results


@pytest.mark.parametrize("hold", [False, True])
def test_drive_against_echo_in_memory(hold):
    pair = connected_sessions(server_stream_factory=EchoFactory(hold=hold, go_away=False))
    results = drive(pair, streams=4, size=700_000)
    assert results == [None] * 4
    assert pair.client.streams == {} and pair.server.streams == {}


def test_drive_big_window_in_memory():
    config = YamuxConfig(max_stream_window_size=4 * 1024 * 1024)
    pair = connected_sessions(server_stream_factory=EchoFactory(False, False), config=config)
    assert drive(pair, streams=2, size=9_000_000) == [None, None]


def test_drive_zero_bytes():
    pair = connected_sessions(server_stream_factory=EchoFactory(False, False))
    assert drive(pair, streams=1, size=0) == [None]


def test_echo_sends_go_away_after_first_stream():
    pair = connected_sessions(server_stream_factory=EchoFactory(False, go_away=True))
    assert drive(pair, streams=1, size=10) == [None]
    assert pair.server.go_away_sent and pair.client.go_away_received


def test_nested_carrier():
    inner_factory = EchoFactory(False, False)
    carrier = CarrierFactory(lambda: YamuxSession(True, inner_factory, None, pair.clock))
    pair = connected_sessions(server_stream_factory=carrier)
    inner = YamuxSession(False, None, None, pair.clock)
    pair.client.open_stream(inner)
    assert drive(pair, streams=3, size=300_000, session=inner) == [None] * 3
    # Only the first outer stream carries a session; another one is reset.
    pair.client.open_stream(Protocol())
    pair.flush()
    assert list(pair.client.streams) == [1]


class CorruptingEcho(Protocol):
    def dataReceived(self, data):
        self.transport.write(bytes([data[0] ^ 1]) + data[1:])


def test_drive_detects_a_corrupted_echo():
    pair = connected_sessions(server_stream_factory=Factory.forProtocol(CorruptingEcho))
    message, = drive(pair, streams=1, size=1000)
    assert message.startswith("stream 1: echo differs within bytes 0..")


@implementer(IHalfCloseableProtocol)
class ReorderingEcho(Protocol):
    """Echoes everything after the FIN, with two 1000-byte pieces swapped."""

    def connectionMade(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        data = self.received
        self.transport.write(data[1000:2000] + data[:1000] + data[2000:])
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def test_drive_detects_reordered_echo():
    # The payload repeats a block, but no piece equals the one before it.
    pair = connected_sessions(server_stream_factory=Factory.forProtocol(ReorderingEcho))
    message, = drive(pair, streams=1, size=5000)
    assert message.startswith("stream 1: echo differs within bytes 0..")


def test_streams_send_different_bytes():
    # Each stream starts at its own offset, so crossed streams would not match.
    readers = [_PatternReader(seed) for seed in (1, 2)]
    sample = _pattern()[_start_offset(1):_start_offset(1) + 4096]
    assert readers[0].matches(sample) and not readers[1].matches(sample)


class ShortEcho(Protocol):
    def dataReceived(self, data):
        self.transport.write(data[:-1])


def test_drive_detects_a_short_echo():
    pair = connected_sessions(server_stream_factory=Factory.forProtocol(ShortEcho))
    message, = drive(pair, streams=1, size=1000)
    assert message == "stream 1: echo ended after 999 of 1000 bytes"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["fly"],
        ["drive"],
        ["drive", "--connect", "nohostport"],
        ["drive", "--connect", "127.0.0.1:1", "--streams", "0"],
        ["drive", "--connect", "127.0.0.1:1", "--bytes", "-1"],
        ["echo", "--role", "peer"],
        ["echo", "--listen", "127.0.0.1:99999"],
    ],
)
def test_parser_rejects(argv):
    with pytest.raises(UsageError):
        build_parser().parse_args(argv)


def test_parser_defaults():
    args = build_parser().parse_args(["drive", "--connect", "localhost:7"])
    assert args.connect == ("localhost", 7)
    assert (args.role, args.streams, args.window, args.nested) == ("client", 1, 256 * 1024, False)
    args = build_parser().parse_args(["echo"])
    assert args.listen == ("127.0.0.1", 0)
    assert (args.role, args.hold, args.goaway) == ("server", False, False)


def test_main_bad_window_is_a_one_line_error(capsys):
    assert main(["echo", "--window", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m grpcmux.yamux: error: max_stream_window_size")


def run_cli(*args, timeout=TIMEOUT):
    return subprocess.run(
        [sys.executable, "-m", "grpcmux.yamux", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["drive", "--connect", "127.0.0.1:1"], "cannot connect to 127.0.0.1:1"),
        (["drive", "--role", "x", "--connect", "127.0.0.1:1"], "argument --role"),
        (["echo", "--listen", "192.0.2.1:0"], "cannot listen on 192.0.2.1:0"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message in done.stderr


@pytest.mark.parametrize("echo_role,drive_role,extra", [
    ("server", "client", []),
    ("client", "server", ["--nested"]),
])
def test_cli_python_to_python(echo_role, drive_role, extra):
    echo = subprocess.Popen(
        [sys.executable, "-m", "grpcmux.yamux", "echo", "--role", echo_role, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        readable, _, _ = select.select([echo.stdout], [], [], TIMEOUT)
        assert readable, "echo printed no address"
        address = echo.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), echo.stderr.read()
        done = run_cli("drive", "--connect", address, "--role", drive_role, "--streams", "8",
                       "--bytes", "500000", *extra)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["streams_ok"] == 8 and result["bytes"] == 8 * 500000
        assert result["rtt_ms"] > 0 and result["mb_per_s"] > 0
        assert echo.wait(TIMEOUT) == 0
    finally:
        echo.kill()
        echo.wait(TIMEOUT)
        echo.stdout.close()
        echo.stderr.close()
