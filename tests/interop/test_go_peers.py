"""The Go reference peers work Go<->Go, so interop failures point at the Python side.

yamuxpeer echo/drive in both yamux roles (half-close, GoAway, big window, nested
sessions), and the legacy grpc-multiplexer emulation: legacyserver +
legacyclient + a grpcio backend, called through the proxy with grpcio.
"""

import json
from concurrent import futures

import grpc
import pytest

from peers import Peer

MiB = 1024 * 1024


def run_go_pair(go_program, echo_args, drive_args, timeout=60.0):
    """Run Go echo + Go drive; return the drive's JSON result."""
    peer = go_program("yamuxpeer")
    with Peer([peer, "echo", "--listen", "127.0.0.1:0", *echo_args]) as echo:
        address = echo.read_line()
        with Peer([peer, "drive", "--connect", address, *drive_args]) as drive:
            line = drive.read_line(timeout)
            assert drive.wait(timeout) == 0, drive.describe()
        assert echo.wait(timeout) == 0, echo.describe()
    return json.loads(line)


@pytest.mark.parametrize("echo_role,drive_role", [("server", "client"), ("client", "server")])
def test_go_yamux_many_streams(go_program, echo_role, drive_role):
    result = run_go_pair(
        go_program,
        ["--role", echo_role],
        ["--role", drive_role, "--streams", "64", "--bytes", str(MiB)],
    )
    assert result["streams_ok"] == 64
    assert result["bytes"] == 64 * MiB
    assert result["rtt_ms"] > 0


def test_go_yamux_hold_echo_needs_half_close(go_program):
    # The echo answers only after our FIN: the driver's half-close must work.
    result = run_go_pair(
        go_program, ["--role", "server", "--hold"], ["--role", "client", "--bytes", str(MiB)]
    )
    assert result["streams_ok"] == 1


def test_go_yamux_big_window_nested(go_program):
    window = str(4 * MiB)
    result = run_go_pair(
        go_program,
        ["--role", "server", "--window", window, "--nested"],
        ["--role", "client", "--window", window, "--nested",
         "--streams", "4", "--bytes", str(8 * MiB)],
    )
    assert result["streams_ok"] == 4


def test_go_yamux_goaway(go_program):
    result = run_go_pair(
        go_program,
        ["--role", "client", "--goaway"],
        ["--role", "server", "--expect-goaway", "--bytes", "1000"],
    )
    assert result["goaway"] is True


@pytest.mark.parametrize(
    "args", [["drive"], ["drive", "--connect", "127.0.0.1:1"], ["bogus"], ["echo", "--role", "x"]]
)
def test_go_yamux_usage_errors_exit_2(go_program, args):
    with Peer([go_program("yamuxpeer"), *args]) as peer:
        assert peer.wait(15) == 2
        assert peer.stderr.startswith("yamuxpeer: ")


# --- legacy grpc-multiplexer emulation -------------------------------------------------


class Backend(grpc.GenericRpcHandler):
    """Raw-bytes test service: echoes requests, reports metadata, fails on demand."""

    def __init__(self):
        self.seen_metadata = []

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method == "/test.Echo/Unary":
            return grpc.unary_unary_rpc_method_handler(self._unary)
        if method == "/test.Echo/Stream":
            return grpc.stream_stream_rpc_method_handler(self._stream)
        return None

    def _unary(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.seen_metadata.append(metadata)
        if "x-fail" in metadata:
            context.set_trailing_metadata([("x-why", "asked")])
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, metadata["x-fail"])
        context.send_initial_metadata([("x-header", "h")])
        context.set_trailing_metadata([("x-trailer", "t")])
        return b"echo:" + request

    def _stream(self, requests, context):
        for request in requests:
            yield request * 2


@pytest.fixture
def backend():
    handler = Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    handler.address = f"127.0.0.1:{port}"
    yield handler
    server.stop(None).wait(10)


@pytest.fixture
def legacy_server(go_program):
    with Peer(
        [
            go_program("legacyserver"),
            "--multiplexer-listener",
            "127.0.0.1:0",
            "--proxy-listener",
            "127.0.0.1:0",
        ]
    ) as server:
        server.multiplexer = server.read_line().split()[1]
        server.proxy = server.read_line().split()[1]
        yield server


@pytest.fixture
def proxy_channel(legacy_server):
    channel = grpc.insecure_channel(legacy_server.proxy)
    yield channel
    channel.close()


def start_client(go_program, legacy_server, backend, client_id):
    client = Peer(
        [
            go_program("legacyclient"),
            "--client-id",
            client_id,
            "--multiplexer-address",
            legacy_server.multiplexer,
            "--grpc-server-address",
            backend.address,
        ]
    )
    assert client.read_line() == "connected"
    assert legacy_server.read_line() == f"registered {client_id}"
    return client


def unary(channel, request, metadata):
    call = channel.unary_unary("/test.Echo/Unary")
    return call.with_call(request, metadata=metadata, timeout=10)


def test_legacy_go_proxy_roundtrip(go_program, legacy_server, proxy_channel, backend):
    with start_client(go_program, legacy_server, backend, "rainbow"):
        response, call = unary(proxy_channel, b"hi", [("client-id", "rainbow"), ("x-a", "1")])
        assert response == b"echo:hi"
        assert ("x-header", "h") in call.initial_metadata()
        assert ("x-trailer", "t") in call.trailing_metadata()
        seen = backend.seen_metadata[-1]
        assert seen["x-a"] == "1"
        assert "client-id" not in seen

        stream = proxy_channel.stream_stream("/test.Echo/Stream")
        replies = list(stream(iter([b"a", b"bc"]), metadata=[("client-id", "rainbow")], timeout=10))
        assert replies == [b"aa", b"bcbc"]

        with pytest.raises(grpc.RpcError) as failed:
            unary(proxy_channel, b"x", [("client-id", "rainbow"), ("x-fail", "nope")])
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failed.value.details() == "nope"
        assert ("x-why", "asked") in failed.value.trailing_metadata()

        # A big message crosses the nested yamux windows many times.
        big = bytes(range(256)) * (12 * 1024)
        response, _ = unary(proxy_channel, big, [("client-id", "rainbow")])
        assert response == b"echo:" + big
    assert legacy_server.read_line() == "unregistered rainbow"


@pytest.mark.parametrize(
    "metadata,code,details",
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "no metadata with key 'client-id' supplied"),
        (
            [("client-id", "a"), ("client-id", "b")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "request needs only one element for metadata 'client-id'",
        ),
        ([("client-id", "ghost")], grpc.StatusCode.NOT_FOUND, "Client 'ghost' not registered"),
    ],
)
def test_legacy_go_routing_errors(proxy_channel, metadata, code, details):
    with pytest.raises(grpc.RpcError) as failed:
        unary(proxy_channel, b"x", metadata)
    assert failed.value.code() == code
    assert failed.value.details() == details
