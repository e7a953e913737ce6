"""The real ``twistd grpcmux-server`` and ``twistd grpcmux-client`` as subprocesses.

A call made through the server's proxy must reach a gRPC backend behind the
client, and SIGTERM must stop both cleanly.  Ports are chosen by the system and
read back from the JSON log lines.
"""

import json
import signal
import sys

import grpc
import pytest

from interop.peers import Peer, python_env
from rpc_backend import Backend, invoke

TIMEOUT = 30.0


def twistd(*argv):
    """``twistd`` run through this interpreter, so the test does not depend on PATH."""
    return Peer(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "--nodaemon", "--pidfile=", *argv, "--log-format", "json"],
        env=python_env(),
    )


def wait_for_event(peer, predicate):
    line = peer.read_until(lambda text: text.startswith("{") and predicate(json.loads(text)),
                           timeout=TIMEOUT)
    return json.loads(line)


@pytest.fixture
def backend(tmp_path):
    b = Backend(str(tmp_path / "backend.sock"), tcp=True)
    yield b
    b.stop()


def test_twistd_server_and_client_carry_a_call(tmp_path, backend):
    with twistd("grpcmux-server", "--multiplexer-listener", "127.0.0.1:0",
                "--proxy-listener", "127.0.0.1:0") as server:
        mux = wait_for_event(server, lambda e: "multiplexer endpoint listening" in e["message"])
        proxy = wait_for_event(server, lambda e: "proxy endpoint listening" in e["message"])
        with twistd("grpcmux-client", "--client-id", "edge-1",
                    "--multiplexer-address", mux["address"],
                    "--grpc-server-address", backend.tcp_address,
                    "--label", "site=lab") as client:
            wait_for_event(client, lambda e: "connected to multiplexer" in e["message"])
            event = wait_for_event(server, lambda e: e.get("client_id") == "edge-1")
            assert event["wire_protocol"] == "native"
            channel = grpc.insecure_channel(f"127.0.0.1:{proxy['port']}")
            try:
                result = invoke(channel, "Unary", b"through twistd", (("client-id", "edge-1"),),
                                TIMEOUT)
            finally:
                channel.close()
            assert (result.code, result.responses) == (grpc.StatusCode.OK, [b"through twistd"])
            client.process.send_signal(signal.SIGTERM)
            assert client.wait(TIMEOUT) == 0
        wait_for_event(server, lambda e: "disconnected" in e["message"])
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
    assert "Traceback" not in server.stderr + client.stderr


def test_twistd_client_in_front_of_the_servers_own_proxy_refuses(tmp_path):
    """The mistake of issue 14 item 5: --grpc-server-address names the proxy."""
    with twistd("grpcmux-server", "--multiplexer-listener", "127.0.0.1:0",
                "--proxy-listener", "127.0.0.1:0", "--default-client-id", "edge-1") as server:
        mux = wait_for_event(server, lambda e: "multiplexer endpoint listening" in e["message"])
        proxy = wait_for_event(server, lambda e: "proxy endpoint listening" in e["message"])
        proxy_address = f"127.0.0.1:{proxy['port']}"
        with twistd("grpcmux-client", "--client-id", "edge-1",
                    "--multiplexer-address", mux["address"],
                    "--grpc-server-address", proxy_address) as client:
            refused = wait_for_event(client, lambda e: "grpcmux proxy endpoint" in e["message"])
            assert refused["level"] == "error"
            assert refused["message"] == (
                f"the gRPC server at {proxy_address} is a grpcmux proxy endpoint; "
                "point --grpc-server-address at your gRPC server")
            wait_for_event(server, lambda e: "reports its gRPC server down" in e["message"])
            channel = grpc.insecure_channel(proxy_address)
            try:  # routed by --default-client-id: without the refusal, a loop
                result = invoke(channel, "Unary", b"loop?", (), TIMEOUT)
            finally:
                channel.close()
            assert (result.code, result.details) == (
                grpc.StatusCode.UNAVAILABLE, "client 'edge-1' reports its gRPC server down")
            client.process.send_signal(signal.SIGTERM)
            assert client.wait(TIMEOUT) == 0
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
    assert "Traceback" not in server.stderr + client.stderr

