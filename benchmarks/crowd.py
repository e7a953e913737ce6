"""Many idle grpcmux clients in one process, for the server-memory benchmark.

Run by ``grpc_bench.py``.  Each stdin line ``grow N`` connects (native handshake,
at most ``--in-flight`` at a time) until N clients are admitted and answers with
``{"clients": N, "seconds": ...}``.  The clients never carry a call; stdin closing
ends the process.
"""

import argparse
import json
import os
import sys
import time

from twisted.internet import epollreactor

epollreactor.install()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import DeferredSemaphore, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.stdio import StandardIO  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from grpcmux.addresses import parse_host_port  # noqa: E402
from grpcmux.client import Tunnel  # noqa: E402
from grpcmux.config import ClientSettings  # noqa: E402
from grpcmux.metrics import ClientMetrics  # noqa: E402

CONNECT_TIMEOUT = 60.0


class Crowd:
    def __init__(self, args):
        self.args = args
        self.host, self.port = parse_host_port(args.multiplexer)
        self.metrics = ClientMetrics()  # one for all: the crowd's own memory is not measured
        self.tunnels = []
        self.limit = DeferredSemaphore(args.in_flight)

    def _connect_one(self, index):
        settings = ClientSettings(client_id=f"{self.args.prefix}{index}",
                                  grpc_server_address=self.args.backend,
                                  multiplexer_address=self.args.multiplexer)
        tunnel = Tunnel(reactor, settings, metrics=self.metrics)
        self.tunnels.append(tunnel)
        endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        admitted = endpoint.connect(tunnel).addCallback(tunnel.admit)
        return admitted.addTimeout(CONNECT_TIMEOUT, reactor)

    def grow(self, target):
        started = time.perf_counter()
        pending = [self.limit.run(self._connect_one, i)
                   for i in range(len(self.tunnels), target)]
        d = gatherResults(pending, consumeErrors=True)
        d.addCallback(lambda _: {"clients": len(self.tunnels),
                                 "seconds": time.perf_counter() - started})
        return d


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, crowd):
        self.crowd = crowd

    def connectionMade(self):
        self.sendLine(b"ready")

    def lineReceived(self, line):
        verb, _, count = line.decode().partition(" ")
        if verb != "grow":
            self.sendLine(json.dumps({"error": f"unknown command {line!r}"}).encode())
            return
        d = self.crowd.grow(int(count))
        d.addErrback(lambda f: {"error": f.getErrorMessage()})
        d.addCallback(lambda result: self.sendLine(json.dumps(result).encode()))

    def connectionLost(self, reason=None):
        if reactor.running:
            reactor.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiplexer", required=True, help="host:port")
    parser.add_argument("--backend", required=True, help="host:port (never dialled)")
    parser.add_argument("--prefix", default="idle-")
    parser.add_argument("--in-flight", type=int, default=48)
    args = parser.parse_args()
    StandardIO(Commands(Crowd(args)), reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    main()
