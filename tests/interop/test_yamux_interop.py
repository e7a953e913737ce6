"""grpcmux.yamux against the Go reference peer (Debian's 2019 hashicorp/yamux).

Every scenario runs with Python as the echo side and as the driving side, and
with Python in both yamux roles: many concurrent streams, a 32 MiB stream
compared byte for byte, half-close (the --hold echo answers only after the
driver's FIN; the driver requires the echo's FIN), ping, GoAway, windows above
256 KiB (equal and unequal on both sides) and a nested session as in the
legacy handshake.
"""

import json

import pytest

from peers import PYTHON_YAMUX, Peer

MiB = 1024 * 1024
TIMEOUT = 90.0

SCENARIOS = {
    "many-streams": ([], ["--streams", "64", "--bytes", str(256 * 1024)]),
    "32MiB-stream": ([], ["--streams", "1", "--bytes", str(32 * MiB)]),
    "half-close": (["--hold"], ["--streams", "4", "--bytes", str(3 * MiB)]),
    "goaway": (["--goaway"], ["--streams", "1", "--bytes", str(MiB), "--expect-goaway"]),
    "window-1MiB": (
        ["--window", str(MiB)],
        ["--window", str(MiB), "--streams", "4", "--bytes", str(8 * MiB)],
    ),
    "nested": (["--nested"], ["--nested", "--streams", "16", "--bytes", str(MiB)]),
    "nested-big-window-hold": (
        ["--nested", "--hold", "--window", str(4 * MiB)],
        ["--nested", "--window", str(4 * MiB), "--streams", "2", "--bytes", str(6 * MiB)],
    ),
}
# The Python side's extra flags when the two sides' windows differ on purpose.
UNEQUAL_WINDOW = {"python": ["--window", str(8 * MiB)], "go": []}


def run_pair(echo_cmd, drive_cmd, echo_args, drive_args):
    with Peer([*echo_cmd, "echo", "--listen", "127.0.0.1:0", *echo_args]) as echo:
        address = echo.read_line()
        assert address.startswith("127.0.0.1:"), echo.describe()
        with Peer([*drive_cmd, "drive", "--connect", address, *drive_args]) as driver:
            line = driver.read_line(TIMEOUT)
            assert driver.wait(TIMEOUT) == 0, f"{line}\n{driver.describe()}"
        assert echo.wait(TIMEOUT) == 0, echo.describe()
    return json.loads(line)


def commands(go_program, python_side):
    go = [go_program("yamuxpeer")]
    return (PYTHON_YAMUX, go) if python_side == "echo" else (go, PYTHON_YAMUX)


def check(result, drive_args):
    streams = int(drive_args[drive_args.index("--streams") + 1])
    size = int(drive_args[drive_args.index("--bytes") + 1])
    assert result["streams_ok"] == streams
    assert result["bytes"] == streams * size
    assert result["rtt_ms"] > 0
    assert result["seconds"] > 0 and result["mb_per_s"] > 0


@pytest.mark.parametrize("python_role", ["client", "server"])
@pytest.mark.parametrize("python_side", ["echo", "drive"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_python_against_go(go_program, scenario, python_side, python_role):
    echo_args, drive_args = SCENARIOS[scenario]
    go_role = "server" if python_role == "client" else "client"
    if python_side == "echo":
        echo_role, drive_role = python_role, go_role
    else:
        echo_role, drive_role = go_role, python_role
    echo_cmd, drive_cmd = commands(go_program, python_side)
    result = run_pair(
        echo_cmd, drive_cmd, [*echo_args, "--role", echo_role], [*drive_args, "--role", drive_role]
    )
    check(result, drive_args)
    if scenario == "goaway":
        assert result["goaway"] is True


@pytest.mark.parametrize("python_side", ["echo", "drive"])
def test_unequal_windows(go_program, python_side):
    """Python advertises 8 MiB, Go keeps 256 KiB: each side honours the other's window."""
    echo_cmd, drive_cmd = commands(go_program, python_side)
    echo_extra = UNEQUAL_WINDOW["python" if python_side == "echo" else "go"]
    drive_extra = UNEQUAL_WINDOW["go" if python_side == "echo" else "python"]
    drive_args = ["--role", "client", "--streams", "3", "--bytes", str(20 * MiB), *drive_extra]
    result = run_pair(echo_cmd, drive_cmd, ["--role", "server", *echo_extra], drive_args)
    check(result, drive_args)
