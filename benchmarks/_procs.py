"""Child processes for the benchmark (``interop.peers.Peer``), /proc figures.

Waiting is always on a child's output with a deadline; a deadline that passes
raises ``BenchError`` with the child's stderr.
"""

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))

from interop.peers import Peer, python_env  # noqa: E402
from reliability_kit.processes import proc_resources  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def _more_files():
    """In the child: raise the open-file limit to the hard limit (10,000 clients)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Child(Peer):
    """A named benchmark process: lines on its stdin, a raised open-file limit."""

    def __init__(self, name, argv, stdin=subprocess.PIPE):
        env = python_env()
        env.setdefault("GRPC_VERBOSITY", "NONE")
        super().__init__(argv, env=env, stdin=stdin, preexec_fn=_more_files)
        self.name = name
        self.pid = self.process.pid

    def read_until(self, predicate, timeout):
        """The first stdout line satisfying ``predicate`` within ``timeout`` seconds."""
        try:
            return super().read_until(predicate, timeout)
        except AssertionError as error:
            raise BenchError(f"{self.name}: {error}") from None

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, timeout=15.0):
        """Close stdin (the backend's and the crowd's signal to end), then terminate."""
        stdin = self.process.stdin
        if self.process.poll() is None and stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except BrokenPipeError:
                pass
        super().stop(timeout)


def twistd(name, *argv):
    """``twistd <plugin> ...`` of this checkout, in the foreground, logging JSON."""
    return Child(name, [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                        "--nodaemon", "--pidfile=", *argv, "--log-format", "json"],
                 stdin=subprocess.DEVNULL)


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # Fields 14 and 15 (utime, stime), counted from after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid):
    """Resident set size of a process in KiB."""
    return proc_resources(pid)["rss"] // 1024
