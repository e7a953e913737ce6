"""A listener that cannot be had stops start-up with one line (issue 14 items 1-2).

``grpcmux.listening.listen`` is what every Twisted listener goes through; the
twistd tests run the real ``twistd grpcmux-server`` with a port held by another
socket, in the foreground and daemonizing, and check the one line, the exit
status, and that nothing is left behind (runtime directory, pid file).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory

from grpcmux.listening import StartupError, listen
from interop.peers import Peer, python_env

TIMEOUT = 60
_TWISTD = ("import sys; sys.argv = ['twistd'] + sys.argv[1:]; "
           "from twisted.scripts.twistd import run; run()")


@pytest.fixture(params=["plain", "reuseport"])
def held_port(request):
    """A loopback port another process listens on (with SO_REUSEPORT, as grpcio)."""
    holder = socket.socket()
    if request.param == "reuseport":
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def test_listen_names_the_option_and_the_address(reactor, held_port):
    with pytest.raises(StartupError) as info:
        listen(reactor, f"127.0.0.1:{held_port}", Factory(), "metrics-listener")
    assert str(info.value) == (
        f"--metrics-listener 127.0.0.1:{held_port}: cannot listen: address already in use")


def test_listen_explains_a_unix_path_that_cannot_be(reactor, tmp_path):
    path = tmp_path / "missing" / "mux.sock"
    with pytest.raises(StartupError) as info:
        listen(reactor, f"unix:{path}", Factory(), "multiplexer-listener")
    assert str(info.value) == (
        f"--multiplexer-listener unix:{path}: cannot listen: no such file or directory")


@pytest_twisted.ensureDeferred
async def test_listen_returns_the_listening_port(reactor):
    port = listen(reactor, "127.0.0.1:0", Factory(), "metrics-listener")
    try:
        assert port.getHost().port > 0
    finally:
        await port.stopListening()


def run_server(tmp_path, *argv, foreground=True, twistd_args=()):
    """``twistd grpcmux-server`` with its own TMPDIR and cwd; the CompletedProcess."""
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {k: v for k, v in python_env().items() if not k.startswith("GRPCMUX_")}
    env.update(HOME=str(tmp_path), TMPDIR=str(temp))
    twistd = ["--nodaemon"] if foreground else ["--logfile", str(tmp_path / "server.log")]
    return subprocess.run(
        [sys.executable, "-c", _TWISTD, *twistd, *twistd_args,
         "--pidfile", str(tmp_path / "twistd.pid"),
         "grpcmux-server", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def assert_one_line_and_nothing_left(tmp_path, result, line):
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    lines = output.splitlines()
    assert sum(line in text for text in lines) == 1, output
    assert not [text for text in lines if (" ERR " in text or " WRN " in text) and line not in text]
    assert os.listdir(tmp_path / "tmp") == []  # no grpcmux-XXXXXXXX runtime directory
    assert "Traceback" not in output
    assert not (tmp_path / "twistd.pid").exists()


@pytest.mark.parametrize("option", ["multiplexer-listener", "proxy-listener", "metrics-listener"])
def test_twistd_stops_on_a_taken_port_in_one_line(tmp_path, held_port, option):
    listeners = {"multiplexer-listener": "127.0.0.1:0", "metrics-listener": "127.0.0.1:0",
                 "proxy-listener": "127.0.0.1:0", option: f"127.0.0.1:{held_port}"}
    argv = [arg for name, value in listeners.items() for arg in (f"--{name}", value)]
    result = run_server(tmp_path, *argv)
    line = f"--{option} 127.0.0.1:{held_port}: cannot listen: address already in use"
    assert_one_line_and_nothing_left(tmp_path, result, line)
    assert result.stderr == ""  # the log (stdout) has it; no second copy


def test_daemonizing_twistd_reports_the_whole_line(tmp_path, held_port):
    result = run_server(tmp_path, "--multiplexer-listener", f"127.0.0.1:{held_port}",
                        "--proxy-listener", "127.0.0.1:0", foreground=False)
    line = f"--multiplexer-listener 127.0.0.1:{held_port}: cannot listen: address already in use"
    assert f"An error has occurred: b'{line}'" in result.stderr  # twistd's parent's words
    assert_one_line_and_nothing_left(tmp_path, result, line)
    log = (tmp_path / "server.log").read_text()
    assert line in log and "Traceback" not in log


def test_a_second_server_on_the_first_ones_proxy_port_does_not_start(tmp_path):
    """The issue's case: grpcio shared the port (SO_REUSEPORT) and calls went to either."""
    first_dir = tmp_path / "first"
    first_dir.mkdir()
    env = {k: v for k, v in python_env().items() if not k.startswith("GRPCMUX_")}
    env["HOME"] = str(first_dir)
    first = Peer([sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=", "grpcmux-server",
                  "--multiplexer-listener", "127.0.0.1:0", "--proxy-listener", "127.0.0.1:0",
                  "--log-format", "json"], env=env)
    try:
        line = first.read_until(lambda text: "proxy endpoint listening" in text, timeout=TIMEOUT)
        proxy = json.loads(line)["address"]
        result = run_server(tmp_path, "--multiplexer-listener", "127.0.0.1:0",
                            "--proxy-listener", proxy)
        assert_one_line_and_nothing_left(
            tmp_path, result, f"--proxy-listener {proxy}: cannot listen: address already in use")
    finally:
        first.process.send_signal(signal.SIGTERM)
        assert first.wait(TIMEOUT) == 0


def test_with_a_log_file_the_line_is_on_stderr_too(tmp_path, held_port):
    result = run_server(tmp_path, "--multiplexer-listener", "127.0.0.1:0",
                        "--metrics-listener", f"127.0.0.1:{held_port}", "--proxy-listener",
                        "127.0.0.1:0", twistd_args=[f"--logfile={tmp_path / 'server.log'}"])
    line = f"--metrics-listener 127.0.0.1:{held_port}: cannot listen: address already in use"
    assert result.stderr == line + "\n"
    assert line in (tmp_path / "server.log").read_text()
    assert_one_line_and_nothing_left(tmp_path, result, line)
