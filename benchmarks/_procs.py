"""Child processes for the benchmark: line-oriented output, /proc figures.

Waiting is always on a child's output with a deadline; a deadline that passes
raises ``BenchError`` with the child's stderr.
"""

import os
import queue
import resource
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def _more_files():
    """In the child: raise the open-file limit to the hard limit (10,000 clients)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("GRPC_VERBOSITY", "NONE")
    return env


class Child:
    """A child process; its stdout lines are queued, its stderr kept."""

    def __init__(self, name, argv, stdin=subprocess.PIPE):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.process = subprocess.Popen(
            self.argv, cwd=REPO, env=python_env(), stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=_more_files,
        )
        self.pid = self.process.pid
        self._lines = queue.Queue()
        self._stderr = []
        self._threads = [threading.Thread(target=self._pump, daemon=True),
                         threading.Thread(target=self._pump_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _pump(self):
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line)

    def fail(self, problem):
        tail = "".join(self._stderr[-20:])
        raise BenchError(f"{self.name}: {problem}\n--- stderr (last lines) ---\n{tail}")

    def read_until(self, predicate, timeout):
        """The first stdout line satisfying ``predicate`` within ``timeout`` seconds."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.fail(f"nothing expected within {timeout}s")
            if line is None:
                self._lines.put(None)
                self.process.wait(5)
                self.fail(f"exited ({self.process.returncode})")
            if predicate(line):
                return line

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, timeout=15.0):
        if self.process.poll() is None:
            if self.process.stdin is not None and not self.process.stdin.closed:
                try:
                    self.process.stdin.close()
                except BrokenPipeError:
                    pass
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for thread in self._threads:
            thread.join(5)


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


def children(pid):
    """The ids of a process's child processes (grpcmux-server's proxy workers)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.extend(int(child) for child in f.read().split())
    return found


def rss_kib(pid):
    """Resident set size of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")
