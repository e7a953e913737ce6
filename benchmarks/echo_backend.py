"""The benchmark's gRPC backend: ``grpcmux.v1.BenchService`` on a grpc.aio server.

Run by ``grpc_bench.py`` in a process of its own; prints ``listening <port>`` once
it serves on 127.0.0.1 (and on ``--unix PATH`` if given, for the proxy stage alone),
and runs until stdin closes or SIGTERM.
"""

import argparse
import asyncio
import os
import sys

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpcmux._proto.grpcmux.v1 import bench_pb2, bench_pb2_grpc  # noqa: E402

UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class BenchServicer(bench_pb2_grpc.BenchServiceServicer):
    """Echoes; server-stream replies of each size are built once and reused."""

    def __init__(self):
        self._replies = {}

    async def Unary(self, request, context):
        return bench_pb2.EchoReply(payload=request.payload)

    async def ServerStream(self, request, context):
        reply = self._replies.get(request.size)
        if reply is None:
            reply = self._replies[request.size] = bench_pb2.EchoReply(
                payload=b"x" * request.size)
        for _ in range(request.count):
            yield reply

    async def ClientStream(self, request_iterator, context):
        received = 0
        async for request in request_iterator:
            received += len(request.payload)
        return bench_pb2.EchoReply(received=received)

    async def Bidi(self, request_iterator, context):
        async for request in request_iterator:
            yield bench_pb2.EchoReply(payload=request.payload)


async def serve(port, unix):
    server = grpc.aio.server(options=UNLIMITED)
    bench_pb2_grpc.add_BenchServiceServicer_to_server(BenchServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if unix:
        server.add_insecure_port(f"unix:{unix}")
    await server.start()
    print(f"listening {bound}", flush=True)
    # Serve until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", help="also serve on this UNIX socket")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.unix))


if __name__ == "__main__":
    main()
