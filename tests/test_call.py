"""``grpcmux call`` end to end: the example server behind a client of a whole stack.

Every call goes user -> proxy -> tunnel -> client -> example server, reflection
included; ``run_cli`` runs the command in a thread while the reactor serves the stack.
Every user mistake ends in one line on stderr and a non-zero status.
"""

import json
import os
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import pytest_twisted
from grpc_reflection.v1alpha import reflection
from twisted.internet.threads import deferToThread

from certs import make_pki
from grpcmux._proto.grpcmux.v1 import demo_pb2, demo_pb2_grpc
from grpcmux.example import SERVICE_NAME, DemoServicer, start_example_server
from grpcmux.rpc.security import ServerTLS
from grpcmux.tokens import ProxyTokens, hash_token
from mux_stack import TIMEOUT, Stack, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = f"{SERVICE_NAME}/Hello"
TOKEN = "call-token-5d1a"


@pytest.fixture
def example():
    server, port = start_example_server("lab")
    yield f"127.0.0.1:{port}"
    server.stop(None).wait(TIMEOUT)


def proxy_of(stack):
    return f"127.0.0.1:{stack.proxy.port}"


def call(stack, *argv, client_id="lab"):
    route = ("--client-id", client_id) if client_id else ()
    return run_cli(stack.reactor, "call", "--proxy-address", proxy_of(stack), *route, *argv)


def replies(out):
    return [json.loads(line) for line in out.splitlines()]


def assert_failed(result, status, start):
    code, out, err = result
    assert (code, out) == (status, ""), result
    assert err.startswith(start), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err


# Calls of each kind


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("wire_protocol", ["native", "legacy"])
async def test_unary_call_through_the_tunnel(stack, example, wire_protocol):
    await stack.connected_client("lab", backend_address=example, wire_protocol=wire_protocol)
    status, out, err = await call(stack, HELLO, "-d", '{"name": "Ada"}')
    assert (status, err) == (0, "")
    assert replies(out) == [{"message": "Hello, Ada!", "server": "lab"}]


@pytest_twisted.ensureDeferred
async def test_without_data_the_request_is_empty(stack, example):
    await stack.connected_client("lab", backend_address=example)
    status, out, _ = await call(stack, f"{SERVICE_NAME}.Hello")  # grpcurl's spelling too
    assert (status, replies(out)) == (0, [{"message": "Hello, world!", "server": "lab"}])


@pytest_twisted.ensureDeferred
async def test_server_streaming_prints_one_object_per_line(stack, example):
    await stack.connected_client("lab", backend_address=example)
    status, out, err = await call(stack, f"{SERVICE_NAME}/HelloMany",
                                  "-d", '{"name": "Bo", "count": 3}')
    assert (status, err) == (0, "")
    assert replies(out) == [{"message": "Hello, Bo!", "server": "lab"}] * 3


@pytest_twisted.ensureDeferred
async def test_client_streaming_from_a_json_array(stack, example):
    await stack.connected_client("lab", backend_address=example)
    status, out, _ = await call(stack, f"{SERVICE_NAME}/HelloAll",
                                "-d", '[{"name": "a"}, {"name": "b"}]')
    assert (status, replies(out)) == (0, [{"message": "Hello, a, b!", "server": "lab"}])


@pytest_twisted.ensureDeferred
async def test_bidi_streaming_from_json_lines_in_a_file(stack, example, tmp_path):
    await stack.connected_client("lab", backend_address=example)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"name": "a"}\n{"name": "b"}\n{}\n')
    status, out, _ = await call(stack, f"{SERVICE_NAME}/HelloEach", "-d", f"@{requests}")
    assert status == 0
    assert [r["message"] for r in replies(out)] == ["Hello, a!", "Hello, b!", "Hello, world!"]


@pytest_twisted.ensureDeferred
async def test_data_from_standard_input_and_proxy_address_from_the_environment(
        stack, example):
    await stack.connected_client("lab", backend_address=example)
    env = dict(os.environ, GRPCMUX_PROXY_ADDRESS=proxy_of(stack), PYTHONPATH=ROOT)
    argv = [sys.executable, "-m", "grpcmux", "call", "--client-id", "lab", HELLO, "-d", "-"]
    result = await deferToThread(
        subprocess.run, argv, input='{"name": "stdin"}', capture_output=True, text=True,
        env=env, cwd=ROOT, timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (0, "")
    assert replies(result.stdout) == [{"message": "Hello, stdin!", "server": "lab"}]


class _EchoMetadata(DemoServicer):
    """Greets with the request's metadata, to show what ``-H`` sent."""

    def Hello(self, request, context):
        seen = sorted(f"{k}={v}" for k, v in context.invocation_metadata()
                      if k.startswith("x-"))
        return demo_pb2.HelloReply(message=",".join(seen), server=self.server_name)


@pytest.fixture
def echo_metadata():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    demo_pb2_grpc.add_DemoServiceServicer_to_server(_EchoMetadata("echo"), server)
    reflection.enable_server_reflection([SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait(TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_headers_are_sent_as_metadata(stack, echo_metadata):
    await stack.connected_client("lab", backend_address=echo_metadata)
    status, out, _ = await call(stack, HELLO, "-H", "X-Team=blue", "-H", "x-n=a=b")
    assert (status, replies(out)) == (0, [{"message": "x-n=a=b,x-team=blue", "server": "echo"}])


# What the server offers


@pytest_twisted.ensureDeferred
async def test_list_shows_the_services_of_the_client(stack, example):
    await stack.connected_client("lab", backend_address=example)
    status, out, _ = await call(stack, "--list")
    assert (status, out.split()) == (0, ["grpc.health.v1.Health",
                                         "grpc.reflection.v1alpha.ServerReflection",
                                         SERVICE_NAME])


@pytest_twisted.ensureDeferred
async def test_describe_a_service_and_a_message(stack, example):
    await stack.connected_client("lab", backend_address=example)
    status, out, _ = await call(stack, "--describe", SERVICE_NAME)
    assert status == 0
    lines = out.splitlines()
    assert lines[:2] == [f"service {SERVICE_NAME} {{",
                         "  rpc Hello(grpcmux.v1.HelloRequest) returns (grpcmux.v1.HelloReply);"]
    assert ("  rpc HelloEach(stream grpcmux.v1.HelloRequest) returns "
            "(stream grpcmux.v1.HelloReply);") in lines
    assert "  uint32 count = 2;" in lines
    status, out, _ = await call(stack, "--describe", "grpcmux.v1.HelloReply")
    assert (status, out.splitlines()) == (0, ["message grpcmux.v1.HelloReply {",
                                              "  string message = 1;", "  string server = 2;",
                                              "}"])


# Mistakes: one line, non-zero status


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "argv, status, start",
    [
        ((HELLO, "-d", '{"name": '), 2, "grpcmux call: -d is not valid JSON: Expecting value"),
        ((HELLO, "-d", '{"nme": "x"}'), 2, "grpcmux call: -d does not fit "
                                           "grpcmux.v1.HelloRequest: Message type"),
        ((HELLO, "-d", '{} {}'), 2, "grpcmux call: -d must hold one JSON object"),
        ((HELLO, "-d", '[1]'), 2, "grpcmux call: -d: a grpcmux.v1.HelloRequest request is a "
                                  "JSON object"),
        ((HELLO, "-d", "@/nonexistent/x.json"), 2, "grpcmux call: -d @/nonexistent/x.json: "
                                                   "cannot read it: No such file"),
        ((f"{SERVICE_NAME}/Goodbye",), 1, "grpcmux call: NOT_FOUND: service "
                                          "grpcmux.v1.DemoService has no method 'Goodbye' "
                                          "(it has: Hello, HelloAll, HelloEach, HelloMany)"),
        (("grpcmux.v1.Nobody/Hello",), 1, "grpcmux call: NOT_FOUND: the gRPC server of client "
                                          "'lab' has no service 'grpcmux.v1.Nobody'"),
        (("--describe", "no.Such"), 1, "grpcmux call: NOT_FOUND: the gRPC server of client "
                                       "'lab' has no service or message type 'no.Such'"),
        ((f"{SERVICE_NAME}/HelloMany", "-d", '{"count": 101}'), 1,
         "grpcmux call: INVALID_ARGUMENT: count must be at most 100, got 101"),
        (("Hello",), 2, "grpcmux call: expected SERVICE/METHOD"),
        ((), 2, "grpcmux call: give one of SERVICE/METHOD, --list or --describe"),
        ((HELLO, "--list"), 2, "grpcmux call: give one of SERVICE/METHOD, --list or"),
        ((HELLO, "-H", "novalue"), 2, "grpcmux call: argument -H/--header: expected KEY=VALUE"),
        ((HELLO, "-H", "client-id=x"), 2, "grpcmux call: argument -H/--header: route with "
                                          "--client-id"),
        ((HELLO, "-H", "grpc-timeout=1"), 2, "grpcmux call: argument -H/--header: "
                                             "'grpc-timeout' is not a metadata key"),
    ],
)
async def test_mistakes_are_one_line(stack, example, argv, status, start):
    await stack.connected_client("lab", backend_address=example)
    assert_failed(await call(stack, *argv), status, start)


@pytest_twisted.ensureDeferred
async def test_unknown_client_id(stack, example):
    await stack.connected_client("lab", backend_address=example)
    assert_failed(await call(stack, HELLO, client_id="nobody"), 1,
                  "grpcmux call: NOT_FOUND: client 'nobody' is not connected")


@pytest_twisted.ensureDeferred
async def test_unreachable_proxy(reactor):
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await run_cli(reactor, "call", "--proxy-address", f"127.0.0.1:{port}",
                           "--client-id", "lab", HELLO)
    assert_failed(result, 1, f"grpcmux call: UNAVAILABLE: cannot reach the grpcmux proxy at "
                             f"127.0.0.1:{port}: failed to connect")


@pytest_twisted.ensureDeferred
async def test_a_server_without_reflection(stack):
    await stack.connected_client("lab")  # the stack's backend: no reflection
    assert_failed(await call(stack, HELLO), 1,
                  "grpcmux call: UNIMPLEMENTED: the gRPC server of client 'lab' offers no "
                  "server reflection")


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(stack, example):
    await stack.connected_client("lab", backend_address=example)
    assert_failed(await call(stack, HELLO, "--timeout", "0.001"), 1,
                  "grpcmux call: DEADLINE_EXCEEDED: no answer within 0.001 s (--timeout)")


# TLS and token, as grpcmux list has them


@pytest_twisted.async_yield_fixture
async def secure_stack(reactor, tmp_path):
    pki = make_pki(tmp_path / "pki")
    tokens_path = tmp_path / "proxy-tokens.yaml"
    tokens_path.write_text(f"{hash_token(TOKEN)}: [lab]\n")
    s = Stack(reactor, tmp_path, proxy_kwargs={
        "tls": ServerTLS.load(pki.server.cert, pki.server.key),
        "tokens": ProxyTokens.load(str(tokens_path)),
    })
    s.ca_path = pki.ca
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_tls_and_token(reactor, secure_stack, example):
    stack = secure_stack
    await stack.connected_client("lab", backend_address=example)
    argv = ("call", "--proxy-address", f"localhost:{stack.proxy.port}", "--client-id", "lab",
            "--tls-ca", stack.ca_path, HELLO)
    status, out, err = await run_cli(reactor, *argv)
    assert_failed((status, out, err), 1, "grpcmux call: UNAUTHENTICATED: ")
    assert err.endswith(" (pass a valid --token or set GRPCMUX_TOKEN)\n")
    status, out, err = await run_cli(reactor, *argv, "--token", TOKEN)
    assert (status, err, replies(out)) == (0, "", [{"message": "Hello, world!",
                                                    "server": "lab"}])
