"""The proxy stage alone: grpcmux's ProxyService with the backend as its only client.

Run by ``grpc_bench.py --stage``.  The proxy is the one ``grpcmux-server`` runs,
with its default engine, but the registry holds a single entry, client id
``bench``, whose "bridge socket" is the backend's own UNIX socket: calls go
caller -> proxy -> backend and skip the tunnel (no reactor splicing, no yamux,
no multiplexer client).  What this process costs per call, and how fast it
streams, bounds any design in which grpcio terminates each call in the proxy.

Prints ``listening <port>`` once it serves on 127.0.0.1; runs until stdin closes.
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpcmux.malloc import tune_malloc  # noqa: E402
from grpcmux.registry import ClientInfo, ClientRegistry  # noqa: E402
from grpcmux.rpc.service import ProxyService  # noqa: E402

CLIENT_ID = "bench"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the backend's UNIX socket")
    args = parser.parse_args()

    from twisted.internet import reactor

    tune_malloc()  # as grpcmux-server does
    registry = ClientRegistry()
    registry.add(ClientInfo(CLIENT_ID, args.socket, time.time(), "local", "native"))
    proxy = ProxyService(reactor, registry, "127.0.0.1:0")

    def serve():
        proxy.startService()
        print(f"listening {proxy.port}", flush=True)

    def wait_for_stdin():
        sys.stdin.read()
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(serve)
    reactor.addSystemEventTrigger("before", "shutdown", proxy.stopService)
    threading.Thread(target=wait_for_stdin, daemon=True).start()
    reactor.run()


if __name__ == "__main__":
    main()
