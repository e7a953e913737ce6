"""The ``grpcmux`` command: list and watch against a real proxy, usage and errors.

``list`` runs in a thread through :func:`grpcmux.cli.run` (it blocks on grpc);
``watch`` runs as ``python -m grpcmux`` so that Ctrl-C (SIGINT) and a closed pipe
are the real thing.  The proxy runs on the reactor of the test, so every wait for
the command happens in a thread with a timeout.
"""

import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from grpcmux import __version__, cli, listing
from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc
from grpcmux.registry import ClientInfo
from mux_stack import TIMEOUT
from rpc_backend import Mux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs grpcmux like the console script, with Ctrl-C raising KeyboardInterrupt even
# when this test run inherited an ignored SIGINT (a background job, nohup).
_CHILD = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('grpcmux', run_name='__main__')"
)

LAB = ClientInfo("lab", 1700000000.5, "192.0.2.7:4567", "native",
                 (("zone", "a"), ("rack", "r1")), health="serving")
OLD = ClientInfo("old", 1700000100.0, "[2001:db8::1]:50000", "legacy")
LAB_JSON = {
    "client_id": "lab",
    "wire_protocol": "native",
    "remote_address": "192.0.2.7:4567",
    "connected_since": "2023-11-14T22:13:20.500Z",
    "labels": {"zone": "a", "rack": "r1"},
    "health": "serving",
}
OLD_JSON = {
    "client_id": "old",
    "wire_protocol": "legacy",
    "remote_address": "[2001:db8::1]:50000",
    "connected_since": "2023-11-14T22:15:00Z",
    "labels": {},
    "health": "unknown",
}
TABLE = (
    "CLIENT ID  PROTOCOL  HEALTH   REMOTE ADDRESS       CONNECTED SINCE       LABELS\n"
    "lab        native    serving  192.0.2.7:4567       2023-11-14T22:13:20Z  rack=r1,zone=a\n"
    "old        legacy    unknown  [2001:db8::1]:50000  2023-11-14T22:15:00Z  -\n"
)


@pytest_twisted.async_yield_fixture
async def mux(reactor, tmp_path):
    m = Mux(reactor, tmp_path)
    yield m
    await m.stop()


def run_cli(reactor, *argv):
    """``grpcmux <argv>`` in a thread: a Deferred of (status, stdout, stderr)."""
    from twisted.internet.threads import deferToThread

    def run():
        out, err = io.StringIO(), io.StringIO()
        status = cli.run(list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    return deferToThread(run).addTimeout(TIMEOUT, reactor)


def run_now(*argv):
    """``grpcmux <argv>`` for what fails before any network use."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def closed_port():
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(text, start):
    assert text.startswith(start), text
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text


# list


@pytest_twisted.ensureDeferred
async def test_list_prints_a_table_sorted_by_client_id(reactor, mux):
    mux.registry.add(OLD)
    mux.registry.add(LAB)
    status, out, err = await run_cli(reactor, "list", "--proxy-address", mux.address)
    assert (status, out, err) == (0, TABLE, "")


@pytest_twisted.ensureDeferred
async def test_list_json_is_an_array_of_objects(reactor, mux):
    mux.registry.add(LAB)
    mux.registry.add(OLD)
    status, out, err = await run_cli(reactor, "list", "--json", "--proxy-address", mux.address)
    assert (status, err) == (0, "")
    assert json.loads(out) == [LAB_JSON, OLD_JSON]


@pytest_twisted.ensureDeferred
async def test_list_with_nobody_connected(reactor, mux):
    status, out, err = await run_cli(reactor, "list", "--proxy-address", mux.address)
    header = "CLIENT ID  PROTOCOL  HEALTH  REMOTE ADDRESS  CONNECTED SINCE  LABELS\n"
    assert (status, out, err) == (0, header, "no clients connected\n")
    status, out, err = await run_cli(reactor, "list", "--json", "--proxy-address", mux.address)
    assert (status, json.loads(out), err) == (0, [], "")


@pytest_twisted.ensureDeferred
async def test_list_through_the_whole_stack(reactor, stack):
    await stack.connected_client("lab", labels=(("zone", "a"),))
    await stack.connected_client("old", wire_protocol="legacy")
    proxy = f"127.0.0.1:{stack.proxy.port}"
    status, out, err = await run_cli(reactor, "list", "--json", "--proxy-address", proxy)
    assert (status, err) == (0, "")
    listed = json.loads(out)
    snapshot = stack.registry.snapshot
    assert [s["client_id"] for s in listed] == ["lab", "old"]
    for server in listed:
        info = snapshot[server["client_id"]]
        assert server["wire_protocol"] == info.wire_protocol
        assert server["remote_address"] == info.remote_address
        assert server["labels"] == dict(info.labels)
    assert listed[0]["labels"] == {"zone": "a"}

    status, out, err = await run_cli(reactor, "list", "--proxy-address", proxy)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert (status, err) == (0, "")
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        ("lab", "native", "unknown", snapshot["lab"].remote_address, "zone=a"),
        ("old", "legacy", "unknown", snapshot["old"].remote_address, "-"),
    ]


@pytest_twisted.ensureDeferred
async def test_python_m_grpcmux_list(reactor, mux):
    mux.registry.add(LAB)
    result = await run_process(reactor, "list", "--json", "--proxy-address", mux.address)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == [LAB_JSON]


def test_servers_of_a_go_server_listing_ids_only():
    response = discovery_pb2.ListGRPCServerResponse(servers=["a", "b"])
    servers = listing.servers_of(response)
    assert [s.as_json() for s in servers] == [
        {"client_id": i, "wire_protocol": "", "remote_address": "", "connected_since": None,
         "labels": {}, "health": "unknown"}
        for i in ("a", "b")
    ]
    out = io.StringIO()
    listing.write_table(out, servers)
    rows = [line.split() for line in out.getvalue().splitlines()[1:]]
    assert rows == [["a", "-", "unknown", "-", "-", "-"], ["b", "-", "unknown", "-", "-", "-"]]


class GoDiscovery(discovery_pb2_grpc.DiscoveryServiceServicer):
    """Discovery as grpc-multiplexer v0.2.1 answers it: ids and events, no details."""

    def ListGRPCServer(self, request, context):
        return discovery_pb2.ListGRPCServerResponse(servers=["a", "b"])

    def WatchGRPCServer(self, request, context):
        event = discovery_pb2.WatchGRPCServerResponse
        yield event(server="a", event=event.EVENT_CONNECTED)
        yield event(server="a", event=event.EVENT_DISCONNECTED)


@pytest.fixture
def go_server():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    discovery_pb2_grpc.add_DiscoveryServiceServicer_to_server(GoDiscovery(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait(TIMEOUT)


def test_list_and_watch_a_go_server(go_server):
    status, out, err = run_now("list", "--proxy-address", go_server)
    assert (status, err) == (0, "")
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["a", "-", "unknown", "-", "-", "-"], ["b", "-", "unknown", "-", "-", "-"]]
    status, out, err = run_now("watch", "--json", "--proxy-address", go_server)
    empty = {"wire_protocol": "", "remote_address": "", "connected_since": None, "labels": {},
             "health": "unknown"}
    assert [json.loads(line) for line in out.splitlines()] == [
        {"event": "connected", "client_id": "a", **empty},
        {"event": "disconnected", "client_id": "a", **empty},
    ]
    # A watch runs until Ctrl-C; a stream that ends is worth a word and a status.
    assert status == 1
    assert_one_line(err, f"grpcmux watch: watch ended: the proxy at {go_server} closed "
                         "the stream")


def test_no_reactor_and_no_grpc_on_import():
    code = ("import sys, grpcmux.cli; assert 'grpc' not in sys.modules; "
            "import grpcmux.__main__; assert 'twisted.internet.reactor' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=TIMEOUT)


# list: errors


@pytest.mark.parametrize(
    "argv, start",
    [
        ((), "grpcmux: the following arguments are required: COMMAND"),
        (("frobnicate",), "grpcmux: argument COMMAND: invalid choice"),
        (("list", "--proxy-address", "localhost"), "grpcmux list: argument --proxy-address: "
                                                    "expected HOST:PORT"),
        (("list", "--proxy-address", "localhost:70000"), "grpcmux list: argument --proxy-add"),
        (("list", "--proxy-address", "bad host:1"), "grpcmux list: argument --proxy-address"),
        (("list", "--timeout", "0"), "grpcmux list: argument --timeout: expected a positive"),
        (("list", "--timeout", "soon"), "grpcmux list: argument --timeout"),
        (("watch", "--replay"), "grpcmux watch: unrecognized arguments: --replay"),
        (("demo", "--client-id", "a/b"), "grpcmux demo: argument --client-id: a client id "
                                          "must not contain '/'"),
        (("demo", "--proxy-listener", "tcp:7592"), "grpcmux demo: argument --proxy-listener"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, start):
    status, out, err = run_now(*argv)
    assert (status, out) == (2, "")
    assert_one_line(err, start)


@pytest.mark.parametrize("argv, line", [
    (("list", "--proxy", "h:1"), "grpcmux list: unrecognized arguments: --proxy h:1; did you "
                                 "mean --proxy-address? (see 'grpcmux list --help')"),
    (("watch", "--no-rep"), "grpcmux watch: unrecognized arguments: --no-rep; did you mean "
                            "--no-replay? (see 'grpcmux watch --help')"),
    (("demo", "--keep"), "grpcmux demo: unrecognized arguments: --keep; did you mean "
                         "--keep-running? (see 'grpcmux demo --help')"),
    (("call", "--tls-server"), "grpcmux call: unrecognized arguments: --tls-server; did you "
                               "mean --tls-server-name? (see 'grpcmux call --help')"),
])
def test_option_names_are_never_abbreviated(argv, line):
    assert run_now(*argv) == (2, "", line + "\n")


def test_a_bad_proxy_address_variable_is_named():
    err = io.StringIO()
    status = cli.run(["list"], io.StringIO(), err, environ={"GRPCMUX_PROXY_ADDRESS": "nohost"})
    assert status == 2
    assert_one_line(err.getvalue(), "grpcmux list: environment variable GRPCMUX_PROXY_ADDRESS: "
                                    "expected HOST:PORT")


def run_with_environ(reactor, environ, *argv):
    from twisted.internet.threads import deferToThread

    def run():
        out, err = io.StringIO(), io.StringIO()
        return cli.run(list(argv), out, err, environ=environ), out.getvalue(), err.getvalue()

    return deferToThread(run).addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("command", ["list", "watch"])
async def test_list_and_watch_read_the_proxy_address_variable(reactor, command):
    address = f"127.0.0.1:{closed_port()}"
    environ = {"GRPCMUX_PROXY_ADDRESS": address, "GRPCMUX_PROXY_ADRESS": "typo"}
    status, out, err = await run_with_environ(reactor, environ, command)
    assert (status, out) == (1, "")
    warning, failure = err.splitlines()
    assert warning == ("grpcmux: warning: environment variable GRPCMUX_PROXY_ADRESS is not a "
                       "grpcmux setting and is ignored; did you mean GRPCMUX_PROXY_ADDRESS?")
    assert failure.startswith(f"grpcmux {command}: cannot reach the grpcmux proxy at {address}")
    # the option still wins over the variable
    other = f"127.0.0.1:{closed_port()}"
    status, out, err = await run_with_environ(
        reactor, {"GRPCMUX_PROXY_ADDRESS": address}, command, "--proxy-address", other)
    assert_one_line(err, f"grpcmux {command}: cannot reach the grpcmux proxy at {other}")


def test_help_and_version_exit_0(capsys):
    assert cli.run(["--version"], io.StringIO(), io.StringIO()) == 0
    assert capsys.readouterr().out == f"grpcmux {__version__}\n"
    assert cli.run(["list", "--help"], io.StringIO(), io.StringIO()) == 0
    assert "--proxy-address HOST:PORT" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("command", ["list", "watch"])
async def test_unreachable_proxy_fails_with_one_line(reactor, command):
    address = f"127.0.0.1:{closed_port()}"
    status, out, err = await run_cli(reactor, command, "--proxy-address", address)
    assert (status, out) == (1, "")
    assert_one_line(err, f"grpcmux {command}: cannot reach the grpcmux proxy at {address}: ")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("command", ["list", "watch"])
async def test_silent_proxy_times_out(reactor, command):
    with socket.socket() as silent:  # accepts TCP (in the backlog), never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        status, out, err = await run_cli(
            reactor, command, "--proxy-address", address, "--timeout", "0.3")
    assert (status, out) == (1, "")
    assert_one_line(err, f"grpcmux {command}: no answer from the grpcmux proxy at {address} "
                         "within 0.3 s")


@pytest_twisted.ensureDeferred
async def test_a_grpc_server_without_discovery(reactor, stack):
    address = stack.backend.tcp_address
    status, out, err = await run_cli(reactor, "list", "--proxy-address", address)
    assert (status, out) == (1, "")
    assert_one_line(err, f"grpcmux list: {address} does not serve the grpcmux Discovery API")


# watch (as a process)


class Watch:
    """``python -m grpcmux watch ...`` with its stdout read line by line in a thread."""

    def __init__(self, reactor, *argv):
        self.reactor = reactor
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, "watch", *argv],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self):
        """A Deferred firing with the next line of output (None at its end)."""
        return self._in_thread(self.lines.get, True, TIMEOUT)

    def ended(self):
        """A Deferred firing with (exit status, stderr) once the process ended."""

        def wait():
            self.process.wait(TIMEOUT)
            self._reader.join(TIMEOUT)
            return self.process.returncode, self.process.stderr.read()

        return self._in_thread(wait)

    def _in_thread(self, fn, *args):
        from twisted.internet.threads import deferToThread

        return deferToThread(fn, *args).addTimeout(TIMEOUT + 5, self.reactor)

    def interrupt(self):
        self.process.send_signal(signal.SIGINT)
        return self.ended()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def watches(reactor):
    started = []

    def start(*argv):
        watch = Watch(reactor, *argv)
        started.append(watch)
        return watch

    yield start
    for watch in started:
        watch.kill()


def subscription_spy(registry):
    """A Deferred firing when the registry gets its next subscriber (a Watch call)."""
    subscribed = Deferred()
    subscribe = registry.subscribe

    def spy(observer, **kwargs):
        del registry.subscribe  # back to the method
        unsubscribe = subscribe(observer, **kwargs)
        subscribed.callback(None)
        return unsubscribe

    registry.subscribe = spy
    return subscribed


@pytest_twisted.ensureDeferred
async def test_watch_json_replays_then_follows_until_ctrl_c(reactor, mux, watches):
    mux.registry.add(LAB)
    watch = watches("--json", "--proxy-address", mux.address)
    assert json.loads(await watch.next_line()) == {"event": "connected", **LAB_JSON}
    mux.registry.add(OLD)
    assert json.loads(await watch.next_line()) == {"event": "connected", **OLD_JSON}
    mux.registry.remove("lab")
    assert json.loads(await watch.next_line()) == {"event": "disconnected", **LAB_JSON}
    assert await watch.interrupt() == (0, "")
    assert await watch.next_line() is None


@pytest_twisted.ensureDeferred
async def test_watch_shows_health_changes(reactor, mux, watches):
    mux.registry.add(LAB)
    watch = watches("--json", "--proxy-address", mux.address)
    assert json.loads(await watch.next_line()) == {"event": "connected", **LAB_JSON}
    mux.registry.update("lab", health="not_serving")
    assert json.loads(await watch.next_line()) == {
        "event": "updated", **LAB_JSON, "health": "not_serving"}
    assert await watch.interrupt() == (0, "")


@pytest_twisted.ensureDeferred
async def test_watch_table_without_replay(reactor, mux, watches):
    mux.registry.add(OLD)
    subscribed = subscription_spy(mux.registry)
    watch = watches("--no-replay", "--proxy-address", mux.address)
    header = await watch.next_line()
    assert header.split() == ["EVENT", "CLIENT", "ID", "PROTOCOL", "HEALTH", "REMOTE",
                              "ADDRESS", "CONNECTED", "SINCE", "LABELS"]
    await subscribed.addTimeout(TIMEOUT, reactor)
    mux.registry.add(LAB)
    mux.registry.remove("old")
    assert await watch.next_line() == (
        "CONNECTED     lab               native    serving      192.0.2.7:4567         "
        "2023-11-14T22:13:20Z  rack=r1,zone=a\n")
    assert (await watch.next_line()).split() == [
        "DISCONNECTED", "old", "legacy", "unknown", "[2001:db8::1]:50000",
        "2023-11-14T22:15:00Z", "-"]
    assert await watch.interrupt() == (0, "")


@pytest_twisted.ensureDeferred
async def test_watch_through_the_whole_stack(reactor, stack, watches):
    await stack.connected_client("early")
    watch = watches("--json", "--proxy-address", f"127.0.0.1:{stack.proxy.port}")
    first = json.loads(await watch.next_line())
    assert (first["event"], first["client_id"]) == ("connected", "early")
    late = await stack.connected_client("late", wire_protocol="legacy")
    second = json.loads(await watch.next_line())
    assert (second["event"], second["client_id"], second["wire_protocol"]) == (
        "connected", "late", "legacy")
    await late.stopService().addTimeout(TIMEOUT, reactor)
    third = json.loads(await watch.next_line())
    assert (third["event"], third["client_id"]) == ("disconnected", "late")
    assert await watch.interrupt() == (0, "")


@pytest_twisted.ensureDeferred
async def test_watch_fails_when_the_proxy_stops(reactor, mux, watches):
    mux.registry.add(LAB)
    watch = watches("--json", "--proxy-address", mux.address)
    assert json.loads(await watch.next_line())["client_id"] == "lab"
    await mux.service.stopService().addTimeout(TIMEOUT, reactor)
    assert await watch.next_line() is None
    status, err = await watch.ended()
    assert status == 1
    assert_one_line(err, "grpcmux watch: watch ended: ")


@pytest_twisted.ensureDeferred
async def test_watch_ends_quietly_when_its_reader_goes_away(reactor, mux):
    from twisted.internet.threads import deferToThread

    mux.registry.add(LAB)
    # Like `grpcmux watch | head -2`: read two lines, then close the pipe.
    process = subprocess.Popen(
        [sys.executable, "-m", "grpcmux", "watch", "--proxy-address", mux.address],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = await deferToThread(
            lambda: [process.stdout.readline() for _ in range(2)]
        ).addTimeout(TIMEOUT, reactor)
        assert lines[1].split()[:2] == ["CONNECTED", "lab"]
        process.stdout.close()
        mux.registry.add(OLD)  # the next line meets a closed pipe
        result = await deferToThread(process.communicate, timeout=TIMEOUT).addTimeout(
            TIMEOUT + 5, reactor)
        assert (process.returncode, result[1]) == (0, "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)


def run_process(reactor, *argv):
    """``python -m grpcmux <argv>`` in a thread: a Deferred of CompletedProcess."""
    from twisted.internet.threads import deferToThread

    return deferToThread(
        subprocess.run, [sys.executable, "-m", "grpcmux", *argv], cwd=ROOT,
        capture_output=True, text=True, timeout=TIMEOUT,
    ).addTimeout(TIMEOUT + 5, reactor)
