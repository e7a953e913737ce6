"""Real etcd processes on loopback for integration tests (Debian's etcd-server).

``EtcdCluster(tmp_path, members=1 or 3)``: ``start()`` launches the members on free
loopback ports with temporary data directories and returns once each says it is
ready to serve clients (its log line, waited for with a timeout: no polling);
``kill(i)``/``restart(i)`` for faults, ``stop()`` at the end. etcd cannot listen on
port 0: ports are picked by binding 127.0.0.1:0 and closing, and a start that loses
the race for a port is retried with new ports.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Logged by embed/serve.go once the member has joined (after ReadyNotify).
READY = "serving client traffic"
_IN_USE = "address already in use"
_LEADER = re.compile(r"became leader at term (\d+)")
START_TIMEOUT = 30.0
_ATTEMPTS = 5


class EtcdStartError(RuntimeError):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Member:
    """One etcd process; its log lines are read by a thread and kept."""

    def __init__(self, name, data_dir, client_port, peer_port, initial_cluster, token,
                 tls=None):
        self.tls = tls
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.token = token
        self.process = None
        self.lines = []
        self._ready = threading.Event()
        self._ended = threading.Event()

    @property
    def url(self):
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def args(self, state):
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", state, "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--experimental-watch-progress-notify-interval", "1s",
            "--logger", "zap", "--log-level", "info",
        ] + ([] if self.tls is None else [
            "--cert-file", self.tls[0], "--key-file", self.tls[1],
            "--trusted-ca-file", self.tls[2], "--client-cert-auth",
        ])

    def launch(self, state="new"):
        self._ready.clear()
        self._ended.clear()
        self.process = subprocess.Popen(
            self.args(state), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace")
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process):
        for line in process.stderr:
            self.lines.append(line)
            if READY in line:
                self._ready.set()
        process.wait()
        self._ended.set()
        self._ready.set()  # wake a waiter: the process is gone

    def wait_ready(self, timeout):
        """True once ready; False if it exited first; EtcdStartError on timeout."""
        if not self._ready.wait(timeout):
            raise EtcdStartError(f"etcd {self.name} not ready within {timeout} s:\n"
                                 + "".join(self.lines[-20:]))
        return not self._ended.is_set() or any(READY in line for line in self.lines)

    def lost_port_race(self):
        return any(_IN_USE in line for line in self.lines)

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self._ended.wait(10)


class EtcdCluster:
    """``members`` etcd processes forming one cluster under ``base_dir``.

    ``tls``: (certificate, key, CA) paths: clients must speak TLS and present a
    certificate that CA signed (the certificate must name 127.0.0.1).
    """

    def __init__(self, base_dir, members=1, tls=None):
        self.tls = tls
        self.base_dir = base_dir
        self.size = members
        self.members = []

    @property
    def endpoints(self):
        """The client URLs, comma-separated, as --cluster-etcd takes them."""
        return ",".join(m.url for m in self.members)

    def start(self, timeout=START_TIMEOUT):
        for attempt in range(_ATTEMPTS):
            self._make_members(attempt)
            for member in self.members:
                member.launch()
            try:
                if all([m.wait_ready(timeout) for m in self.members]):
                    return self
            except EtcdStartError:
                if not any(m.lost_port_race() for m in self.members):
                    self.stop()
                    raise
            lost = any(m.lost_port_race() for m in self.members)
            self.stop()
            if not lost:
                raise EtcdStartError("etcd exited at start:\n" + "".join(
                    line for m in self.members for line in m.lines[-10:]))
        raise EtcdStartError(f"no free ports for etcd after {_ATTEMPTS} attempts")

    def _make_members(self, attempt):
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        names = [f"m{i}" for i in range(self.size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, (_, p) in zip(names, ports))
        token = f"grpcmux-test-{os.getpid()}-{id(self)}-{attempt}"
        self.members = []
        for name, (client, peer) in zip(names, ports):
            data_dir = self.base_dir / f"etcd-{name}-{attempt}"
            self.members.append(_Member(name, data_dir, client, peer, initial, token,
                                        self.tls))

    def leader(self):
        """Index of the running member that became leader last (from the logs)."""
        best = None
        for index, member in enumerate(self.members):
            if member.process is None or member.process.poll() is not None:
                continue
            for line in member.lines:
                match = _LEADER.search(line)
                if match and (best is None or int(match.group(1)) > best[0]):
                    best = (int(match.group(1)), index)
        if best is None:
            raise EtcdStartError("no member says it is the leader")
        return best[1]

    def kill(self, index):
        """kill -9 one member."""
        self.members[index].kill()

    def restart(self, index, timeout=START_TIMEOUT):
        """Start a killed member again on its data directory and ports."""
        member = self.members[index]
        member.lines.clear()
        member.launch("existing")
        if not member.wait_ready(timeout):
            raise EtcdStartError(f"etcd {member.name} exited on restart:\n"
                                 + "".join(member.lines[-20:]))

    def stop(self):
        for member in self.members:
            member.kill()
