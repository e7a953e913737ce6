"""Subprocess peers for the interop tests: line-oriented output with timeouts.

Nothing here sleeps: waiting is always on a process's output or its exit,
with a deadline, and a deadline that passes fails the test with the peer's stderr.
"""

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON_YAMUX = [sys.executable, "-m", "grpcmux.yamux"]


def python_env():
    """Environment in which ``python -m grpcmux...`` imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Peer:
    """A child process whose stdout lines are read with timeouts."""

    def __init__(self, argv, env=None, stdin=subprocess.DEVNULL, preexec_fn=None):
        self.argv = [str(arg) for arg in argv]
        self.process = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=env if env is not None else python_env(),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        self._lines = queue.Queue()
        self._stderr = []
        self._readers = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump_stdout(self):
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line)

    @property
    def stderr(self):
        return "".join(self._stderr)

    def describe(self):
        return f"{' '.join(self.argv)}\n--- stderr ---\n{self.stderr}"

    def read_line(self, timeout=15.0):
        """The next stdout line; fails on timeout or end of output."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s from {self.describe()}") from None
        if line is None:
            self._lines.put(None)
            self.wait(timeout)
            raise AssertionError(
                f"output ended (exit {self.process.returncode}) from {self.describe()}"
            )
        return line

    def read_until(self, predicate, timeout=15.0):
        """Read lines until one satisfies ``predicate``; return it."""
        while True:
            line = self.read_line(timeout)
            if predicate(line):
                return line

    def wait(self, timeout=60.0):
        """Exit code; kills the process and fails if it does not exit in time."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"still running after {timeout}s: {self.describe()}") from None
        for reader in self._readers:
            reader.join(timeout)
        return code

    def stop(self, timeout=5.0):
        """Terminate (then, after ``timeout`` seconds, kill) the process if it still runs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for reader in self._readers:
            reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
