"""A grpc.aio backend for the reliability scenarios, as its own process.

Serves ``/test.Echo/Unary`` (echo), ``/test.Echo/Bidi`` (echo each message) and
``/test.Echo/Flood`` (a server stream of pattern chunks; the request is the
number of bytes to send, as decimal text).  Prints ``{"event": "listening",
"port": P}`` once serving, ``{"event": "flood_progress", "produced": N}`` after
every MiB a flood call got past ``write`` (flow control holds ``write`` back), and
``{"event": "flood_ended", "produced": N}`` when a flood call ends.
"""

import argparse
import asyncio
import json
import sys

import grpc

from reliability_kit.pattern import CHUNK, SERVICE, chunk


PROGRESS = 1024 * 1024  # report every MiB handed to grpc


def emit(**fields):
    print(json.dumps(fields), flush=True)


async def unary(request, context):
    return request


async def bidi(requests, context):
    async for request in requests:
        yield request


async def flood(request, context):
    total = int(request.decode())
    produced = 0
    index = 0
    try:
        while produced < total:
            await context.write(chunk(index))
            produced += CHUNK
            index += 1
            if produced % PROGRESS == 0:
                emit(event="flood_progress", produced=produced)
    finally:
        emit(event="flood_ended", produced=produced)


async def serve(port):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Flood": grpc.unary_stream_rpc_method_handler(flood),
    }
    server = grpc.aio.server(
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        options=[("grpc.max_concurrent_streams", 100000)],
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    emit(event="listening", port=bound)
    await server.wait_for_termination()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    sys.exit(main())
