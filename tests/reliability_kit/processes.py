"""Real grpcmux processes for the reliability scenarios, driven from the reactor.

Each child writes JSON lines on stdout (twistd's ``--log-format json``, or the
kit's own helpers); a test waits for a line matching a predicate with a Deferred
that has a timeout, so nothing polls and nothing sleeps.  Resource figures
(RSS, open fds, threads) are read from ``/proc``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from interop.peers import REPO, python_env

KIT = Path(__file__).resolve().parent
TIMEOUT = 30.0


def child_env():
    """The environment of a child: this checkout and its tests on ``PYTHONPATH``."""
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    return env


class Child(ProcessProtocol):
    """A child process whose stdout JSON lines can be awaited."""

    def __init__(self, reactor, name):
        self.reactor = reactor
        self.name = name
        self.events = []
        self.stderr = []
        self._buffer = b""
        self._waiters = []
        self._ended = Deferred()
        self.exit = None

    def start(self, argv):
        self.argv = [str(arg) for arg in argv]
        self.reactor.spawnProcess(self, sys.executable, [sys.executable, *self.argv],
                                  env=child_env(), path=str(REPO))
        return self

    @property
    def pid(self):
        return self.transport.pid

    # -- ProcessProtocol ---------------------------------------------------------

    def outReceived(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.decode("utf-8", "replace"))

    def errReceived(self, data):
        self.stderr.append(data.decode("utf-8", "replace"))

    def processEnded(self, reason):
        self.exit = reason.value
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            if not waiter.called:
                waiter.errback(AssertionError(
                    f"{self.name} exited ({reason.value}) while a test waited for a line"
                    f"\n--- stderr ---\n{''.join(self.stderr)[-4000:]}"))
        self._ended.callback(reason.value)

    def _line(self, text):
        try:
            event = json.loads(text)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        event["_seen"] = time.monotonic()
        self.events.append(event)
        for entry in list(self._waiters):
            predicate, waiter = entry
            if predicate(event):
                self._waiters.remove(entry)
                waiter.callback(event)

    # -- waiting -----------------------------------------------------------------

    def wait_for(self, predicate, timeout=TIMEOUT, since=0):
        """A Deferred firing with the first event (index >= ``since``) matching."""
        for event in self.events[since:]:
            if predicate(event):
                return succeed(event)
        if self.exit is not None:
            return fail(AssertionError(f"{self.name} has exited"))
        waiter = Deferred()
        self._waiters.append((predicate, waiter))
        return waiter.addTimeout(timeout, self.reactor)

    def wait_for_message(self, fragment, timeout=TIMEOUT, since=0, **fields):
        def matches(event):
            return fragment in event.get("message", "") and all(
                event.get(k) == v for k, v in fields.items())

        return self.wait_for(matches, timeout, since)

    # -- control -----------------------------------------------------------------

    def signal(self, name):
        """Send SIGKILL/SIGSTOP/SIGCONT/...; the monotonic time it was sent."""
        os.kill(self.pid, getattr(signal, "SIG" + name))
        return time.monotonic()

    def when_ended(self, timeout=TIMEOUT):
        d = Deferred()
        self._ended.addBoth(lambda result: (d.callback(result), result)[1])
        return d.addTimeout(timeout, self.reactor)

    def stop(self, timeout=TIMEOUT):
        """SIGTERM (after SIGCONT, in case it is frozen); SIGKILL if it lingers."""
        if self.exit is not None:
            return succeed(self.exit)
        try:
            self.transport.signalProcess(signal.SIGCONT)
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return succeed(None)
        return self.when_ended(timeout).addErrback(lambda _: self.kill())

    def kill(self):
        if self.exit is not None:
            return succeed(self.exit)
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            return succeed(None)
        return self.when_ended(10.0)

    # -- resources ---------------------------------------------------------------

    def resources(self):
        """RSS (bytes), open fds and threads of the process, from /proc."""
        return proc_resources(self.pid)


def proc_resources(pid):
    """RSS (bytes), open fds and threads of process ``pid``, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss": int(fields["VmRSS"].split()[0]) * 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def twistd(reactor, name, plugin, *argv):
    """Start ``twistd <plugin>`` in the foreground with JSON logs."""
    child = Child(reactor, name)
    return child.start(["-c", "from twisted.scripts.twistd import run; run()",
                        "--nodaemon", "--pidfile=", plugin, "--log-format", "json", *argv])


def kit_script(reactor, name, script, *argv):
    """Start one of this kit's helper scripts (``echo_backend``, ``swarm``)."""
    child = Child(reactor, name)
    return child.start([str(KIT / f"{script}.py"), *argv])


class MuxServer:
    """``twistd grpcmux-server`` on loopback; restartable on the same ports."""

    def __init__(self, reactor, workdir, keepalive=(30.0, 10.0), extra=()):
        self.reactor = reactor
        self.workdir = Path(workdir)
        self.keepalive = keepalive
        self.extra = tuple(extra)
        self.runtime_dir = self.workdir / "run"
        self.multiplexer_port = 0
        self.proxy_port = 0
        self.child = None

    async def start(self):
        interval, timeout = self.keepalive
        self.child = twistd(
            self.reactor, "grpcmux-server", "grpcmux-server",
            "--multiplexer-listener", f"127.0.0.1:{self.multiplexer_port}",
            "--proxy-listener", f"127.0.0.1:{self.proxy_port}",
            "--runtime-dir", self.runtime_dir,
            "--keepalive-interval", interval, "--keepalive-timeout", timeout,
            "--shutdown-grace", "1", *self.extra)
        mux = await self.child.wait_for_message("multiplexer endpoint listening")
        proxy = await self.child.wait_for_message("proxy endpoint listening")
        self.multiplexer_port = int(mux["address"].rpartition(":")[2])
        self.proxy_port = int(proxy["port"])
        return self

    @property
    def multiplexer_address(self):
        return f"127.0.0.1:{self.multiplexer_port}"

    @property
    def proxy_address(self):
        return f"127.0.0.1:{self.proxy_port}"

    def runtime_sockets(self):
        """Sockets in the runtime directory: the local services' one, whatever the load."""
        return len(list(self.runtime_dir.glob("*.sock"))) if self.runtime_dir.exists() else 0

    def resources(self):
        figures = self.child.resources()
        figures["runtime_sockets"] = self.runtime_sockets()
        return figures


def mux_client(reactor, client_id, multiplexer_address, backend_address,
               keepalive=(30.0, 10.0)):
    """``twistd grpcmux-client``; wait for it with ``client_admitted``."""
    interval, timeout = keepalive
    return twistd(reactor, f"grpcmux-client {client_id}", "grpcmux-client",
                  "--client-id", client_id, "--multiplexer-address", multiplexer_address,
                  "--grpc-server-address", backend_address,
                  "--keepalive-interval", interval, "--keepalive-timeout", timeout,
                  "--shutdown-grace", "1")


def client_admitted(child, since=0, timeout=TIMEOUT):
    return child.wait_for_message("connected to multiplexer", timeout, since)
