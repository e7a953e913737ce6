"""README's commands, as pasted: "Running it" runs and works, and "Testing" is CI's.

The commands are read from the README itself, so the section cannot drift from what
grpcmux does.  Its fixed ports are swapped for free ones; ``grpcmux list`` and
``call``, which use the default proxy address, get it from $GRPCMUX_PROXY_ADDRESS.
"""

import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.request

from interop.peers import REPO, Peer, python_env

TIMEOUT = 30.0
README_PORTS = (50051, 7602, 7592, 9102)  # example, multiplexer, proxy, metrics


def running_it_commands():
    """The shell commands of the literal blocks of "Running it", continuation lines joined."""
    text = (REPO / "README.rst").read_text()
    section = text[text.index("Running it\n---"):]
    section = section[:section.index("\n\ngrpcmux call\n~~~")]
    commands = []
    for block in re.findall(r"::\n\n((?:    .*\n?)+)", section):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv_of(command, ports):
    for readme_port, port in ports.items():
        command = command.replace(f":{readme_port}", f":{port}")
    program, *args = shlex.split(command)
    if program == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                *args, "--log-format", "json"]
    assert program == "grpcmux", command
    return [sys.executable, "-m", "grpcmux", *args]


def logged(peer, words):
    return peer.read_until(lambda line: line.startswith("{") and words in
                           json.loads(line)["message"], timeout=TIMEOUT)


def test_running_it_works_as_pasted():
    commands = running_it_commands()
    example, server, client, *calls = commands
    assert [c.split()[:2] for c in calls] == [["grpcmux", "list"]] + [["grpcmux", "call"]] * 3
    ports = {port: free_port() for port in README_PORTS}
    env = dict(python_env(), GRPCMUX_PROXY_ADDRESS=f"127.0.0.1:{ports[7592]}")
    with Peer(argv_of(example, ports), env=env) as example_server:
        assert "listening on" in example_server.read_line(TIMEOUT)
        with Peer(argv_of(server, ports), env=env) as mux:
            logged(mux, "metrics on")  # the server starts its metrics endpoint first
            logged(mux, "proxy endpoint listening")
            with Peer(argv_of(client, ports), env=env):
                logged(mux, "client lab-7 connected")
                results = [subprocess.run(argv_of(c, ports), env=env, cwd=REPO, text=True,
                                          capture_output=True, timeout=TIMEOUT)
                           for c in calls]
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[9102]}/status.json",
                                            timeout=TIMEOUT) as response:
                    status = json.load(response)
    for result in results:
        assert (result.returncode, result.stderr) == (0, ""), result
    listing, services, hello, many = (r.stdout for r in results)
    assert listing.splitlines()[1].split()[:2] == ["lab-7", "native"]
    assert "grpcmux.v1.DemoService" in services.split()
    assert json.loads(hello) == {"message": "Hello, Ada!", "server": "example"}
    assert [json.loads(line) for line in many.splitlines()] == [
        {"message": "Hello, world!", "server": "example"}] * 3
    assert status["rows"][0][:3] == ["lab-7", "site=berlin", "native"]


def test_the_test_command_is_the_one_ci_runs():
    text = (REPO / "README.rst").read_text()
    section = text[text.index("Testing\n---"):]
    (block,) = re.findall(r"::\n\n    (.*)\n", section)[:1]
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert block == ci
