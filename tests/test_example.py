"""``grpcmux example-server``: serves the example service until SIGTERM, as a process."""

import os
import re
import signal
import socket
import subprocess
import sys

import grpc

from grpcmux._proto.grpcmux.v1 import demo_pb2, demo_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30


def test_serves_until_sigterm_then_exits_0():
    process = subprocess.Popen(
        [sys.executable, "-m", "grpcmux", "example-server", "--listen", "127.0.0.1:0",
         "--name", "ex"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+); Ctrl-C to stop$", line)
        assert match, line
        with grpc.insecure_channel(f"127.0.0.1:{match[1]}") as channel:
            reply = demo_pb2_grpc.DemoServiceStub(channel).Hello(
                demo_pb2.HelloRequest(name="Ada"), timeout=TIMEOUT)
        assert (reply.message, reply.server) == ("Hello, Ada!", "ex")
        process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=TIMEOUT)
        assert (process.returncode, rest, err) == (0, "", "")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=TIMEOUT)


def test_a_taken_port_fails_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "grpcmux", "example-server", "--listen", address],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"grpcmux example-server: the example gRPC server cannot "
                             f"listen on {address}\n")


def test_a_bad_listen_address_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "grpcmux", "example-server", "--listen", "nowhere"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("grpcmux example-server: argument --listen: expected")
    assert result.stderr.count("\n") == 1
