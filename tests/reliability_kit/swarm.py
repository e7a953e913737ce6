"""Many grpcmux client sessions in one process, for the load and churn scenarios.

``hold``: connect ``--count`` clients (``<prefix>-<n>``), print
``{"event": "admitted", ...}``, keep them until SIGTERM, then stop them all.
``churn``: ``--cycles`` times connect a client, wait until it is admitted and stop
it, ``--concurrency`` at a time; print ``{"event": "churned", ...}`` and exit.
Every line on stdout is one JSON object.
"""

import argparse
import json
import signal
import sys
import time

from twisted.internet import defer, task
from twisted.internet.defer import DeferredList, DeferredSemaphore

from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings

TIMEOUT = 60.0


def emit(**fields):
    print(json.dumps(fields), flush=True)


def start_client(reactor, client_id, args):
    settings = ClientSettings(client_id=client_id, grpc_server_address=args.backend,
                              multiplexer_address=args.multiplexer, shutdown_grace=1.0)
    service = TunnelClientService(reactor, Tunnel(reactor, settings))
    service.startService()
    admitted = service.when_connected().addTimeout(TIMEOUT, reactor)
    return service, admitted


async def hold(reactor, args):
    started = time.monotonic()
    services = []
    gate = DeferredSemaphore(args.concurrency)

    def one(n):
        service, admitted = start_client(reactor, f"{args.prefix}-{n}", args)
        services.append(service)
        return admitted

    await DeferredList([gate.run(one, n) for n in range(args.count)],
                       fireOnOneErrback=True, consumeErrors=True)
    emit(event="admitted", count=len(services), seconds=time.monotonic() - started)
    stopping = defer.Deferred()
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stopping.callback, None))
    await stopping
    await DeferredList([s.stopService() for s in services]).addTimeout(TIMEOUT, reactor)
    emit(event="stopped", count=len(services))


async def churn(reactor, args):
    started = time.monotonic()
    gate = DeferredSemaphore(args.concurrency)
    failed = []

    async def cycle(n):
        service, admitted = start_client(reactor, f"{args.prefix}-{n}", args)
        try:
            await admitted
        except Exception as error:  # counted and reported, not fatal to the run
            failed.append(repr(error))
        await service.stopService().addTimeout(TIMEOUT, reactor)

    await DeferredList([gate.run(lambda n=n: defer.ensureDeferred(cycle(n)))
                        for n in range(args.cycles)], consumeErrors=True)
    emit(event="churned", cycles=args.cycles, failed=len(failed), errors=failed[:5],
         seconds=time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["hold", "churn"])
    parser.add_argument("--multiplexer", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    run = hold if args.mode == "hold" else churn
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    sys.exit(main())
