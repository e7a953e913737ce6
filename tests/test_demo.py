"""``grpcmux demo``: run as a process, it starts everything, calls through it, exits.

The demo owns its process's reactor, so it only ever runs as ``python -m grpcmux``;
the helpers it is built from are tested here directly.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading

import grpc
import pytest

from grpcmux._proto.grpcmux.v1 import demo_pb2, demo_pb2_grpc
from grpcmux.demo import dial_address
from grpcmux.example import DemoServicer, start_example_server
from grpcmux.tap import client as client_tap
from grpcmux.tap import server as server_tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 60
# Runs grpcmux with Ctrl-C raising KeyboardInterrupt even when this test run
# inherited an ignored SIGINT (a background job, nohup).
_CHILD = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('grpcmux', run_name='__main__')"
)


def grpcmux(*argv, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "grpcmux", *argv], cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT, **kwargs,
    )


def assert_succeeded(result):
    assert (result.returncode, result.stderr) == (0, ""), (
        f"exit {result.returncode}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}")


def command_after(stdout, prefix):
    """The printed command line starting with ``prefix``, split like a shell would."""
    for line in stdout.splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line)
    raise AssertionError(f"no line starting with {prefix!r} in:\n{stdout}")


def test_demo_calls_the_example_through_the_proxy_and_exits_0():
    result = grpcmux("demo")
    assert_succeeded(result)
    out = result.stdout
    assert "Reply from server 'demo': Hello, world!\n" in out
    listing = out[out.index("Discovery listing"):].splitlines()[1:]
    assert listing[0].split() == ["CLIENT", "ID", "PROTOCOL", "HEALTH", "REMOTE", "ADDRESS",
                                  "CONNECTED", "SINCE", "LABELS"]
    row = listing[1].split()
    assert (len(listing), row[0], row[1], row[2], row[5]) == (
        2, "demo", "native", "unknown", "example=demo")
    call = command_after(out, "grpcmux call")
    assert call[:3] + call[4:] == ["grpcmux", "call", "--proxy-address", "--client-id", "demo",
                                   "grpcmux.v1.DemoService/Hello", "-d", '{"name": "world"}']
    example = command_after(out, "grpcmux example-server")
    assert example[:3] == ["grpcmux", "example-server", "--listen"]


def test_demo_with_another_id_and_name():
    result = grpcmux("demo", "--client-id", "lab-7", "--name", "Ada")
    assert_succeeded(result)
    assert "Reply from server 'lab-7': Hello, Ada!\n" in result.stdout
    assert ["--client-id", "lab-7"] == command_after(result.stdout, "grpcmux call")[4:6]


def test_printed_twistd_commands_are_valid_options(tmp_path):
    result = grpcmux("demo")
    assert_succeeded(result)
    out = result.stdout
    server = command_after(out, "twistd -n --pidfile= grpcmux-server")
    client = command_after(out, "twistd -n --pidfile= grpcmux-client")
    isolated = dict(environ={}, home=str(tmp_path), etc_dir=str(tmp_path))
    server_options = server_tap.Options(**isolated)
    server_options.parseOptions(server[4:])
    client_options = client_tap.Options(**isolated)
    client_options.parseOptions(client[4:])
    settings = client_options.settings
    assert (settings.client_id, settings.labels) == ("demo", (("example", "demo"),))
    assert settings.multiplexer_address == server_options.settings.multiplexer_listener
    proxy = command_after(out, "grpcmux call")[3]
    assert server_options.settings.proxy_listener == proxy
    assert command_after(out, "grpcmux list") == ["grpcmux", "list", "--proxy-address", proxy]


def test_keep_running_serves_until_ctrl_c():
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "demo", "--keep-running"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    timer = threading.Timer(TIMEOUT, process.kill)  # a hung demo fails, not hangs
    timer.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Running until Ctrl-C"):
                break
        out = "".join(lines)
        proxy = command_after(out, "grpcmux list")[-1]
        with grpc.insecure_channel(proxy) as channel:
            reply = demo_pb2_grpc.DemoServiceStub(channel).Hello(
                demo_pb2.HelloRequest(name="again"), metadata=(("client-id", "demo"),),
                timeout=TIMEOUT)
        assert (reply.message, reply.server) == ("Hello, again!", "demo")
        called = grpcmux(*command_after(out, "grpcmux call")[1:])  # as printed
        assert_succeeded(called)
        assert json.loads(called.stdout) == {"message": "Hello, world!", "server": "demo"}
        listed = grpcmux("list", "--json", "--proxy-address", proxy)
        assert_succeeded(listed)
        assert [s["client_id"] for s in json.loads(listed.stdout)] == ["demo"]
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=TIMEOUT)
        assert (process.returncode, err, rest) == (0, "", "")
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)


@pytest.mark.parametrize("listener", ["--proxy-listener", "--multiplexer-listener"])
def test_a_taken_port_fails_with_one_line(listener):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        result = grpcmux("demo", listener, address)
    what = "proxy endpoint" if listener == "--proxy-listener" else "multiplexer server"
    assert result.returncode == 1
    assert result.stderr.startswith(f"grpcmux demo: cannot start the {what}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "Reply" not in result.stdout


def test_bad_client_id_is_a_usage_error():
    result = grpcmux("demo", "--client-id", "two words")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("grpcmux demo: argument --client-id: a client id must not "
                             "contain whitespace, got 'two words' "
                             "(see 'grpcmux demo --help')\n")


# The parts


def test_importing_the_demo_leaves_the_reactor_alone():
    code = "import sys, grpcmux.demo; assert 'twisted.internet.reactor' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=TIMEOUT)


def test_example_server_greets_and_names_itself():
    server, port = start_example_server("lab")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = demo_pb2_grpc.DemoServiceStub(channel)
            reply = stub.Hello(demo_pb2.HelloRequest(), timeout=TIMEOUT)
    finally:
        server.stop(None).wait(TIMEOUT)
    assert (reply.message, reply.server) == ("Hello, world!", "lab")


def test_servicer_uses_the_given_name():
    reply = DemoServicer("x").Hello(demo_pb2.HelloRequest(name="Bo"), context=None)
    assert (reply.message, reply.server) == ("Hello, Bo!", "x")


def test_servicer_streams_each_kind():
    servicer = DemoServicer("x")
    many = servicer.HelloMany(demo_pb2.HelloManyRequest(name="Bo", count=2), context=None)
    assert [r.message for r in many] == ["Hello, Bo!"] * 2
    names = [demo_pb2.HelloRequest(name=n) for n in ("a", "")]
    assert servicer.HelloAll(iter(names), context=None).message == "Hello, a, world!"
    assert servicer.HelloAll(iter(()), context=None).message == "Hello, nobody!"
    assert [r.message for r in servicer.HelloEach(iter(names), context=None)] == [
        "Hello, a!", "Hello, world!"]


def test_example_server_serves_health():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port = start_example_server("lab")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            replies = [stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
                       for name in ("", "grpcmux.v1.DemoService")]
    finally:
        server.stop(None).wait(TIMEOUT)
    assert {r.status for r in replies} == {health_pb2.HealthCheckResponse.SERVING}


@pytest.mark.parametrize(
    "listen, port, expected",
    [
        ("127.0.0.1:0", 5, "127.0.0.1:5"),
        (":0", 5, "127.0.0.1:5"),
        ("0.0.0.0:7592", 7592, "127.0.0.1:7592"),
        ("[::]:0", 6, "[::1]:6"),
        ("[::1]:0", 6, "[::1]:6"),
        ("localhost:0", 7, "localhost:7"),
    ],
)
def test_dial_address_of_a_listener(listen, port, expected):
    assert dial_address(listen, port) == expected
