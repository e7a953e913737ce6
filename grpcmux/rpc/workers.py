"""``--proxy-workers N``: N processes serve the proxy port, the reactor process splices.

One Python process has one GIL, shared by the reactor (which splices every tunnel's
bytes) and grpcio (which terminates and re-originates every call).  With workers,
each of N child processes runs its own :class:`~grpcmux.rpc.service.ProxyService`
on the same port (grpcio binds with SO_REUSEPORT, so the kernel spreads incoming
connections across them) and reaches a client through its bridge socket, exactly
as the in-process proxy does.  The server process keeps the registry and only
splices bytes.

The workers learn who is connected from a *feed*: a private UNIX socket in the
runtime directory on which the server sends its registry snapshot, a ``synced``
line, then every change, one JSON object per line.  A worker starts serving once
synced, says ``ready`` on the feed, and exits when the feed closes (the server is
gone).  A worker that dies is started again.

A worker logs JSON lines to a pipe; the server re-emits each in its own log, at
the worker's level, so the workers' logs go wherever the server's go (a file, the
journal) even when twistd has daemonized and has no terminal.  What a worker writes
to stderr (a traceback, grpc's own messages) is relayed as warnings.
"""

import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineOnlyReceiver

from grpcmux.addresses import parse_host_port
from grpcmux.registry import CONNECTED, ClientInfo, ClientRegistry

FEED_SOCKET = "proxy-feed.sock"
# Seconds before a worker that died is started again (no tight crash loop).
RESTART_DELAY = 1.0
# Seconds a stopping worker gets beyond the shutdown grace before it is killed.
_KILL_MARGIN = 5.0
_MAX_LINE = 1 << 20


def _event_line(kind, info, graceful=False):
    info_fields = dataclasses.asdict(info)
    return json.dumps({"kind": kind, "graceful": graceful, "info": info_fields}).encode()


def _info(fields):
    fields = dict(fields, labels=tuple(tuple(pair) for pair in fields["labels"]))
    return ClientInfo(**fields)


class _FeedConnection(LineOnlyReceiver):
    """The server's side of one worker's feed: snapshot, ``synced``, then changes."""

    delimiter = b"\n"
    MAX_LENGTH = _MAX_LINE

    def __init__(self, pool):
        self._pool = pool
        self._unsubscribe = None

    def connectionMade(self):
        registry = self._pool.registry
        for info in registry.snapshot.values():
            self.sendLine(_event_line(CONNECTED, info))
        self.sendLine(b'{"kind": "synced"}')
        self._unsubscribe = registry.subscribe(self._changed)

    def _changed(self, event):
        self.sendLine(_event_line(event.kind, event.info, event.graceful))

    def lineReceived(self, line):
        if line.startswith(b"ready "):
            self._pool.worker_ready(int(line.split()[1]))

    def connectionLost(self, reason=None):
        if self._unsubscribe is not None:
            self._unsubscribe()


# A worker's JSON level names (grpcmux.logging) -> the level it is re-emitted at.
_WORKER_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warning": LogLevel.warn,
                  "error": LogLevel.error, "critical": LogLevel.critical}


class _WorkerProcess(ProcessProtocol):
    """One worker: its end is reported to the pool, its output relayed line by line."""

    def __init__(self, pool):
        self._pool = pool
        self.ended = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd, data):
        lines = (self._partial[fd] + data).split(b"\n")
        self._partial[fd] = lines.pop()
        if len(self._partial[fd]) > _MAX_LINE:  # no newline in sight: pass it on cut
            lines.append(self._partial[fd])
            self._partial[fd] = b""
        for line in lines:
            self._relay(fd, line)

    def _relay(self, fd, line):
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        if fd == 1:
            self._pool.worker_logged(self.transport.pid, text)
        else:
            self._pool.worker_stderr(self.transport.pid, text)

    def processEnded(self, reason):
        for fd, rest in self._partial.items():
            self._relay(fd, rest)
        self._partial = {1: b"", 2: b""}
        self._pool.worker_ended(self, reason.value.exitCode, reason.value.signal)
        self.ended.callback(None)


class ProxyWorkerPool(Service):
    """Runs ``workers`` proxy processes on ``listen_address`` fed by ``registry``.

    Stands in for ProxyService in the server: ``port`` is the proxy port once
    started.  ``runtime_dir()`` names the (private) directory for the feed socket
    when the pool starts.  ``worker_options`` are the ProxyService settings the
    workers get (routing, message size, call limits per worker, and the paths of
    the proxy's TLS and token files, which each worker reads).
    """

    _log = Logger()

    def __init__(self, reactor, registry, listen_address, workers, runtime_dir,
                 shutdown_grace=10.0, log_level="info", **worker_options):
        self._reactor = reactor
        self.registry = registry
        self.listen_address = listen_address
        self.workers = workers
        self._runtime_dir = runtime_dir
        self.feed_path = None
        self.shutdown_grace = shutdown_grace
        # JSON, which the pool parses and re-emits (worker_logged).
        self._log_args = ["--log-level", log_level, "--log-format", "json"]
        self._worker_options = worker_options
        self.port = None
        self._holder = None  # keeps a chosen port ours until the workers bind it
        self._feed = None
        self._processes = set()
        self._ready = 0
        self._ready_waiters = []
        self._announced = False
        self._restarts = set()

    def startService(self):
        host, port = parse_host_port(self.listen_address, listener=True)
        # Bound here first: a port that is taken fails the start, as without workers,
        # and port 0 becomes one port that all the workers share.
        try:
            self._holder = _reserve_port(host, port)
        except OSError as error:
            raise OSError(f"proxy endpoint cannot listen on {self.listen_address!r}: "
                          f"{error.strerror or error}") from None
        self.port = port = self._holder.getsockname()[1]
        self.feed_path = os.path.join(self._runtime_dir(), FEED_SOCKET)
        self._address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        factory = Factory.forProtocol(lambda: _FeedConnection(self))
        factory.noisy = False
        self._feed = self._reactor.listenUNIX(self.feed_path, factory, mode=0o600,
                                              wantPID=False)
        super().startService()
        for _ in range(self.workers):
            self._spawn()

    def _argv(self):
        argv = [sys.executable, "-m", "grpcmux.rpc.workers", "--feed", self.feed_path,
                "--listen", self._address, "--shutdown-grace", str(self.shutdown_grace),
                *self._log_args]
        for name, value in sorted(self._worker_options.items()):
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv

    def _spawn(self):
        worker = _WorkerProcess(self)
        env = dict(os.environ)
        # The workers run this very grpcmux, wherever it was imported from.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._reactor.spawnProcess(worker, sys.executable, self._argv(), env=env,
                                   childFDs={0: "w", 1: "r", 2: "r"})
        self._processes.add(worker)

    def when_ready(self):
        """A Deferred firing once every worker serves the port (now, or after a restart)."""
        waiter = Deferred()
        if self._ready == self.workers:
            waiter.callback(None)
        else:
            self._ready_waiters.append(waiter)
        return waiter

    def worker_ready(self, port):
        self._ready += 1
        if self._ready == self.workers:
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            if self._announced:
                return  # a restarted worker: said already
            self._announced = True
            if self._holder is not None:
                self._holder.close()
                self._holder = None
            self._log.info("proxy endpoint listening on {address} (port {port}), "
                           "{workers} worker processes",
                           address=self.listen_address, port=self.port, workers=self.workers)

    def worker_logged(self, pid, line):
        """Re-emit one of a worker's JSON log lines here, at its level."""
        try:
            record = json.loads(line)
            level = _WORKER_LEVELS[record["level"]]
            message = str(record["message"])
        except (ValueError, KeyError, TypeError):
            level, message, record = LogLevel.info, line, {}
        if "traceback" in record:
            message = f"{message}\n{record['traceback']}"
        self._log.emit(level, "proxy worker {worker_pid}: {worker_message}",
                       worker_pid=pid, worker_message=message,
                       worker_namespace=record.get("namespace"))

    def worker_stderr(self, pid, line):
        self._log.warn("proxy worker {worker_pid} (stderr): {worker_message}",
                       worker_pid=pid, worker_message=line)

    def worker_ended(self, worker, code, signal_number):
        self._processes.discard(worker)
        if not self.running:
            return
        self._ready = max(0, self._ready - 1)
        self._log.error("proxy worker exited (code {code}, signal {signal}); "
                        "starting another in {delay}s",
                        code=code, signal=signal_number, delay=RESTART_DELAY)
        call = self._reactor.callLater(RESTART_DELAY, self._restart)
        self._restarts.add(call)

    def _restart(self):
        self._restarts = {c for c in self._restarts if c.active()}
        if self.running:
            self._spawn()

    def stopService(self):
        """SIGTERM to every worker (each lets its calls finish); fires once all exited."""
        super().stopService()
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = []
        for worker in list(self._processes):
            ended.append(worker.ended)
            _signal(worker, signal.SIGTERM)
        kill = self._reactor.callLater(self.shutdown_grace + _KILL_MARGIN, self._kill_all)
        done = DeferredList(ended)

        def finished(_):
            if kill.active():
                kill.cancel()
            if self._holder is not None:
                self._holder.close()
                self._holder = None
            feed, self._feed = self._feed, None
            self._log.info("proxy endpoint stopped")
            return feed.stopListening() if feed is not None else None

        return done.addCallback(finished)

    def _kill_all(self):
        for worker in list(self._processes):
            _signal(worker, signal.SIGKILL)


def _signal(worker, number):
    try:
        worker.transport.signalProcess(number)
    except Exception:  # noqa: BLE001 - it exited in the meantime
        pass


def _reserve_port(host, port):
    """A bound, never listening SO_REUSEPORT socket: the port the workers will share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError:
        holder.close()
        raise
    return holder


# -- the worker process -----------------------------------------------------------


class _FeedFollower(LineOnlyReceiver):
    """A worker's side of the feed: mirrors the server's registry into ``registry``."""

    delimiter = b"\n"
    MAX_LENGTH = _MAX_LINE

    def __init__(self, registry, stop):
        self._registry = registry
        self._stop = stop
        self.synced = Deferred()

    def lineReceived(self, line):
        event = json.loads(line)
        if event["kind"] == "synced":
            self.synced.callback(self)
            return
        info = _info(event["info"])
        if event["kind"] == CONNECTED:
            self._registry.remove(info.client_id)  # a stale entry, should one remain
            self._registry.add(info)
        else:
            self._registry.remove(info.client_id, graceful=event["graceful"])

    def connectionLost(self, reason=None):
        self._stop()  # the server is gone: so is its proxy


def worker_main(argv=None):
    """``python -m grpcmux.rpc.workers``: one proxy worker (started by the server)."""
    import argparse

    from twisted.internet import reactor

    from grpcmux.logging import start_logging
    from grpcmux.malloc import tune_malloc
    from grpcmux.rpc.security import load_proxy_security
    from grpcmux.rpc.service import ProxyService

    tune_malloc()
    parser = argparse.ArgumentParser(description="a grpcmux proxy worker process")
    parser.add_argument("--feed", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--shutdown-grace", type=float, default=10.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="pretty")
    parser.add_argument("--authority-domain")
    parser.add_argument("--default-client-id")
    parser.add_argument("--max-message-size", type=int)
    parser.add_argument("--max-concurrent-calls", type=int)
    parser.add_argument("--max-calls-per-client", type=int)
    for name in ("proxy-tls-cert", "proxy-tls-key", "proxy-tls-client-ca", "proxy-auth-tokens"):
        parser.add_argument("--" + name)
    args = parser.parse_args(argv)
    start_logging(sys.stdout, args.log_level, args.log_format)
    security = load_proxy_security(args)  # the server checked these files already
    # Limits the server did not pass keep ProxyService's own defaults.
    limits = {name: getattr(args, name) for name in ("max_concurrent_calls", "max_calls_per_client")
              if getattr(args, name) is not None}
    registry = ClientRegistry()
    proxy = ProxyService(reactor, registry, args.listen,
                         authority_domain=args.authority_domain,
                         default_client_id=args.default_client_id,
                         max_message_size=args.max_message_size,
                         tls=security.tls,
                         tokens=security.tokens,
                         shutdown_grace=args.shutdown_grace,
                         **limits)
    stopping = []

    def stop_once(*_):
        # Under systemd or a terminal the whole process group gets the signal, the
        # server passes it on too: stop once, whatever asks.
        if not stopping:
            stopping.append(True)
            reactor.callFromThread(reactor.stop)

    follower = _FeedFollower(registry, stop_once)

    def serve(_):
        proxy.startService()
        follower.sendLine(f"ready {proxy.port}".encode())

    def failed(failure):
        ProxyWorkerPool._log.failure("proxy worker cannot start", failure)
        stop_once()

    def start():
        factory = Factory.forProtocol(lambda: follower)
        factory.noisy = False
        connecting = UNIXClientEndpoint(reactor, args.feed).connect(factory)
        connecting.addCallback(lambda _: follower.synced).addCallback(serve)
        connecting.addErrback(failed)

    def stop():
        return proxy.stopService() if proxy.running else None

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    signal.signal(signal.SIGTERM, stop_once)
    signal.signal(signal.SIGINT, stop_once)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    worker_main()
