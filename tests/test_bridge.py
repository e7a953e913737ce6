"""Bridge sockets: a 0700 runtime directory, 0600 sockets, removed on departure and at exit.

Every check runs under umask 0, the worst a service manager can hand us.
"""

import os
import socket
import stat

import pytest
import pytest_twisted

from grpcmux.bridge import Bridge
from grpcmux.listening import StartupError
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer
from mux_stack import TIMEOUT, Stack

LOOPBACK = "tcp:0:interface=127.0.0.1"


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def stale_socket(path):
    """A socket file left behind, as by a process that crashed."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


@pytest_twisted.ensureDeferred
async def test_a_bridge_socket_is_0600_and_goes_away_on_stop(reactor, tmp_path, umask_zero):
    path = str(tmp_path / "1.sock")
    bridge = Bridge(reactor, path, session=None, client_id="c")
    bridge.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode(path) == 0o600
    await bridge.stop()
    assert not os.path.exists(path)


@pytest_twisted.ensureDeferred
async def test_a_private_runtime_dir_is_0700_and_removed_at_exit(reactor, umask_zero):
    server = MultiplexerServer(reactor, ClientRegistry(), LOOPBACK)
    server.startService()
    runtime_dir = server.runtime_dir
    assert mode(runtime_dir) == 0o700
    await server.stopService()
    assert not os.path.exists(runtime_dir)


@pytest_twisted.ensureDeferred
async def test_a_configured_runtime_dir_is_made_private_and_cleared(reactor, tmp_path, umask_zero):
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o755)
    stale_socket(runtime_dir / "3.sock")
    (runtime_dir / "notes.sock").write_text("not ours")
    (runtime_dir / "4.sock").write_text("a file, not a socket")
    server = MultiplexerServer(reactor, ClientRegistry(), LOOPBACK, runtime_dir=str(runtime_dir))
    server.startService()
    try:
        assert mode(runtime_dir) == 0o700
        assert sorted(os.listdir(runtime_dir)) == ["4.sock", "notes.sock"]
    finally:
        await server.stopService()
    assert runtime_dir.is_dir()  # the operator's directory stays


@pytest.mark.parametrize("make", [
    lambda target, path: os.symlink(target, path),
    lambda target, path: open(path, "w").close(),
])
def test_a_runtime_dir_that_is_not_our_directory_is_refused(reactor, tmp_path, make):
    path = tmp_path / "run"
    make(tmp_path, path)
    server = MultiplexerServer(reactor, ClientRegistry(), LOOPBACK, runtime_dir=str(path))
    with pytest.raises(StartupError) as info:
        server.startService()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--runtime-dir: runtime directory {path}")
    assert "must be a directory (not a link)" in message
    assert server.port is None


@pytest_twisted.ensureDeferred
async def test_client_sockets_are_0600_and_removed_on_departure_and_at_exit(
        reactor, tmp_path, umask_zero):
    stack = Stack(reactor, tmp_path)
    try:
        leaving = await stack.connected_client("leaving")
        await stack.connected_client("staying")
        runtime_dir = stack.server.runtime_dir
        assert mode(runtime_dir) == 0o700
        paths = {c: stack.registry.snapshot[c].socket_path for c in ("leaving", "staying")}
        for path in paths.values():
            assert os.path.dirname(path) == runtime_dir and mode(path) == 0o600
        connection = stack.server.connected_clients["leaving"]
        gone = stack.registry_event("leaving")
        await leaving.stopService()
        await gone  # unlisted at once; the session ends once its calls are done
        await connection.session.when_closed().addTimeout(TIMEOUT, reactor)
        await connection.depart().addTimeout(TIMEOUT, reactor)  # fires once the file is gone
        assert not os.path.exists(paths["leaving"])
        assert os.path.exists(paths["staying"])
    finally:
        await stack.stop()
    assert os.listdir(runtime_dir) == []
