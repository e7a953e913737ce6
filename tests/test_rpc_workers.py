"""--proxy-workers: proxy processes fed by the server's registry serve the proxy port.

Real worker processes on loopback. A channel keeps one connection, so it talks to
one worker throughout: a Watch on it tells when *that* worker has seen a change.
"""

import json
import signal
import socket

import grpc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from grpcmux import server as server_module
from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.config import ServerSettings
from grpcmux.rpc.service import ProxyService
from grpcmux.registry import ClientRegistry
from grpcmux.rpc.workers import ProxyWorkerPool, _WorkerProcess
from grpcmux.tokens import hash_token
from mux_stack import TIMEOUT, Stack
from rpc_backend import UNLIMITED, invoke, route


class WorkerStack(Stack):
    """The test stack with its in-process proxy swapped for a pool of workers."""

    def __init__(self, reactor, tmp_path, workers=2, **worker_options):
        super().__init__(reactor, tmp_path)
        self.proxy.stopService()
        self.channel.close()
        self.pool = ProxyWorkerPool(reactor, self.registry, "127.0.0.1:0", workers,
                                    lambda: self.server.runtime_dir, shutdown_grace=1.0,
                                    log_level="warning",
                                    **worker_options)
        self.pool.startService()
        self.address = f"127.0.0.1:{self.pool.port}"

    def ready(self):
        return self.pool.when_ready().addTimeout(TIMEOUT, self.reactor)

    def new_channel(self):
        return grpc.insecure_channel(self.address, options=UNLIMITED)

    async def stop(self):
        if self.pool.running:
            await self.pool.stopService().addTimeout(TIMEOUT, self.reactor)
        await super().stop()


def _watch_until(channel, client_id, kind, started):
    """Watch on ``channel`` until ``client_id`` has the event ``kind`` (blocking).

    ``started()`` runs at the first event, the replay of a client already connected.
    """
    stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    stream = stub.WatchGRPCServer(discovery_pb2.WatchGRPCServerRequest(replay=True),
                                  timeout=TIMEOUT)
    for i, event in enumerate(stream):
        if i == 0:
            started()
        if event.server == client_id and event.event == kind:
            stream.cancel()
            return event
    raise AssertionError(f"the watch ended before {client_id} was {kind}")


@pytest_twisted.ensureDeferred
async def test_workers_carry_calls_to_clients_connected_before_and_after(reactor, tmp_path):
    stack = WorkerStack(reactor, tmp_path)
    try:
        await stack.connected_client("early")
        await stack.ready()
        channel = stack.new_channel()
        # Each new channel is a new connection: several reach both workers.
        channels = [stack.new_channel() for _ in range(6)]
        for c in channels:
            result = await stack.in_thread(invoke, c, "Unary", b"hi", route("early"), TIMEOUT)
            assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"hi"])
        started = Deferred()
        watched = stack.in_thread(_watch_until, channel, "late",
                                  discovery_pb2.WatchGRPCServerResponse.EVENT_CONNECTED,
                                  lambda: reactor.callFromThread(started.callback, None))
        await started.addTimeout(TIMEOUT, reactor)
        await stack.connected_client("late")
        await watched
        result = await stack.in_thread(invoke, channel, "Unary", b"new", route("late"), TIMEOUT)
        assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"new"])
        for c in channels + [channel]:
            c.close()
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_a_departed_client_is_not_found_through_the_workers(reactor, tmp_path):
    stack = WorkerStack(reactor, tmp_path, workers=1)
    try:
        client = await stack.connected_client("gone")
        await stack.ready()
        channel = stack.new_channel()
        started = Deferred()
        watched = stack.in_thread(_watch_until, channel, "gone",
                                  discovery_pb2.WatchGRPCServerResponse.EVENT_DISCONNECTED,
                                  lambda: reactor.callFromThread(started.callback, None))
        await started.addTimeout(TIMEOUT, reactor)
        await client.stopService().addTimeout(TIMEOUT, reactor)
        await watched
        result = await stack.in_thread(invoke, channel, "Unary", b"x", route("gone"), TIMEOUT)
        assert result.code == grpc.StatusCode.NOT_FOUND
        assert "not connected" in result.details
        channel.close()
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_worker_is_replaced_and_stop_ends_them_all(reactor, tmp_path):
    stack = WorkerStack(reactor, tmp_path, workers=1)
    try:
        await stack.connected_client("edge")
        await stack.ready()
        [worker] = stack.pool._processes
        worker.transport.signalProcess(signal.SIGKILL)
        await worker.ended.addTimeout(TIMEOUT, reactor)
        await stack.ready()  # the replacement serves
        [replacement] = stack.pool._processes
        assert replacement is not worker
        channel = stack.new_channel()
        result = await stack.in_thread(invoke, channel, "Unary", b"again", route("edge"),
                                       TIMEOUT)
        assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"again"])
        channel.close()
        await stack.pool.stopService().addTimeout(TIMEOUT, reactor)
        assert not stack.pool._processes
        await replacement.ended.addTimeout(TIMEOUT, reactor)
    finally:
        await stack.stop()


def test_a_taken_port_fails_the_start_and_spawns_nothing(reactor, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    pool = ProxyWorkerPool(reactor, None, f"127.0.0.1:{port}", 2, lambda: str(tmp_path))
    try:
        with pytest.raises(OSError, match=f"proxy endpoint cannot listen on '127.0.0.1:{port}'"):
            pool.startService()
    finally:
        taken.close()
    assert not pool.running and not pool._processes


@pytest_twisted.ensureDeferred
async def test_workers_enforce_the_proxy_tokens(reactor, tmp_path):
    tokens = tmp_path / "proxy-tokens.yaml"
    tokens.write_text(f"{hash_token('edge-secret')}: edge\n")
    stack = WorkerStack(reactor, tmp_path, workers=1, proxy_auth_tokens=str(tokens))
    try:
        await stack.connected_client("edge")
        await stack.connected_client("other")
        await stack.ready()
        channel = stack.new_channel()
        refused = await stack.in_thread(invoke, channel, "Unary", b"x", route("edge"), TIMEOUT)
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
        token = (("grpcmux-token", "edge-secret"),)
        denied = await stack.in_thread(invoke, channel, "Unary", b"x",
                                       route("other") + token, TIMEOUT)
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED
        allowed = await stack.in_thread(invoke, channel, "Unary", b"ok",
                                        route("edge") + token, TIMEOUT)
        assert (allowed.code, allowed.responses) == (grpc.StatusCode.OK, [b"ok"])
        channel.close()
    finally:
        await stack.stop()


def test_the_server_uses_the_pool_when_asked(reactor, tmp_path):
    tokens = tmp_path / "proxy-tokens.yaml"
    tokens.write_text(f"{hash_token('t')}: '*'\n")
    settings = ServerSettings(proxy_workers=3, max_proxy_calls=100, max_calls_per_client=10,
                              proxy_auth_tokens=str(tokens))
    pooled = server_module.make_service(settings, reactor).proxy
    assert isinstance(pooled, ProxyWorkerPool) and pooled.workers == 3
    # Every worker reads the token file and enforces its share of the call limits.
    options = pooled._worker_options
    assert options["proxy_auth_tokens"] == str(tokens)
    assert (options["max_concurrent_calls"], options["max_calls_per_client"]) == (34, 4)
    assert isinstance(server_module.make_service(ServerSettings(), reactor).proxy, ProxyService)


class _Pid:
    pid = 4242


def test_a_workers_output_goes_to_the_server_log_at_its_level(log_events):
    # Under a daemonized twistd a worker has no terminal: its JSON log lines (and
    # anything on its stderr) are re-emitted in the server's log, whatever splits them.
    pool = ProxyWorkerPool(None, ClientRegistry(), "127.0.0.1:0", 1, lambda: "/nonexistent")
    worker = _WorkerProcess(pool)
    worker.transport = _Pid()
    warning = json.dumps({"time": "2026-11-25T01:00:00.000Z", "level": "warning",
                          "message": "no route to client edge-1",
                          "namespace": "grpcmux.rpc.proxy"}).encode()
    worker.childDataReceived(1, warning[:9])
    worker.childDataReceived(1, warning[9:] + b"\n" + json.dumps(
        {"level": "error", "message": "boom", "traceback": "Traceback (most recent call last)"}
    ).encode() + b"\nnot json\n")
    worker.childDataReceived(2, b"E1125 grpc says so\nno newline at the end")
    worker.processEnded(Failure(ProcessDone(0)))
    relayed = [(formatEvent(e), e["log_level"]) for e in log_events if "worker_pid" in e]
    assert relayed == [
        ("proxy worker 4242: no route to client edge-1", LogLevel.warn),
        ("proxy worker 4242: boom\nTraceback (most recent call last)", LogLevel.error),
        ("proxy worker 4242: not json", LogLevel.info),
        ("proxy worker 4242 (stderr): E1125 grpc says so", LogLevel.warn),
        ("proxy worker 4242 (stderr): no newline at the end", LogLevel.warn),
    ]
    assert [e["worker_namespace"] for e in log_events if "worker_namespace" in e][0] == \
        "grpcmux.rpc.proxy"
