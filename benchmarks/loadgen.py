"""The benchmark's load generator: grpc.aio calls to BenchService, one job at a time.

Run by ``grpc_bench.py``.  Each stdin line is a JSON job; each result is one JSON
line on stdout.  A job names a ``target`` (host:port), ``metadata`` (pairs), a
``scenario`` (unary, server_stream, client_stream, bidi) and either a
``concurrency`` (closed loop: each worker starts its next call when the last one
ended) or a ``rate`` (open loop: calls start on a fixed schedule, calls/s).  Channels
are kept per target, so every measurement runs on a warm connection.
"""

import asyncio
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpcmux._proto.grpcmux.v1 import bench_pb2, bench_pb2_grpc  # noqa: E402

UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class Job:
    """One measurement; ``op(worker_state)`` makes one call (or one round trip)."""

    def __init__(self, stub, spec):
        self.stub = stub
        self.metadata = tuple(tuple(pair) for pair in spec.get("metadata", ()))
        self.scenario = spec["scenario"]
        self.size = spec.get("size", 100)
        self.count = spec.get("count", 16)
        self.bytes = 0
        self.request = bench_pb2.EchoRequest(payload=b"p" * self.size)

    async def open_worker(self):
        """Per-worker state: the bidi stream, for ping-pong."""
        if self.scenario == "bidi":
            return self.stub.Bidi(metadata=self.metadata)
        return None

    async def close_worker(self, state):
        if state is not None:
            await state.done_writing()
            while await state.read() is not grpc.aio.EOF:
                pass

    async def op(self, state):
        if self.scenario == "unary":
            reply = await self.stub.Unary(self.request, metadata=self.metadata)
            self.bytes += len(reply.payload)
        elif self.scenario == "server_stream":
            request = bench_pb2.EchoRequest(count=self.count, size=self.size)
            async for reply in self.stub.ServerStream(request, metadata=self.metadata):
                self.bytes += len(reply.payload)
        elif self.scenario == "client_stream":
            reply = await self.stub.ClientStream([self.request] * self.count,
                                                 metadata=self.metadata)
            self.bytes += reply.received
        elif self.scenario == "bidi":
            await state.write(self.request)
            reply = await state.read()
            self.bytes += len(reply.payload)
        else:
            raise ValueError(f"unknown scenario {self.scenario!r}")


async def closed_loop(job, concurrency, duration, warmup):
    latencies = []
    states = [await job.open_worker() for _ in range(concurrency)]
    clock = time.perf_counter

    async def worker(state, until, record):
        while clock() < until:
            started = clock()
            await job.op(state)
            if record:
                latencies.append(clock() - started)

    await asyncio.gather(*(worker(s, clock() + warmup, False) for s in states))
    job.bytes = 0
    start = clock()
    await asyncio.gather(*(worker(s, start + duration, True) for s in states))
    elapsed = clock() - start
    for state in states:
        await job.close_worker(state)
    return latencies, elapsed


async def open_loop(job, rate, duration, warmup):
    clock = time.perf_counter
    latencies = []

    async def timed(record):
        started = clock()
        await job.op(None)
        if record:
            latencies.append(clock() - started)

    async def schedule(seconds, record):
        tasks, start = [], clock()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(timed(record)))
        await asyncio.gather(*tasks)
        return clock() - start

    await schedule(warmup, False)
    job.bytes = 0
    elapsed = await schedule(duration, True)
    return latencies, elapsed


async def run():
    loop = asyncio.get_running_loop()
    channels = {}
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        spec = json.loads(line)
        target = spec["target"]
        if target not in channels:
            channels[target] = grpc.aio.insecure_channel(target, options=UNLIMITED)
        job = Job(bench_pb2_grpc.BenchServiceStub(channels[target]), spec)
        try:
            if spec.get("rate"):
                latencies, elapsed = await open_loop(job, spec["rate"], spec["duration"],
                                                     spec.get("warmup", 0.0))
            else:
                latencies, elapsed = await closed_loop(job, spec.get("concurrency", 1),
                                                       spec["duration"], spec.get("warmup", 0.0))
        except grpc.RpcError as error:
            print(json.dumps({"error": f"{error.code().name}: {error.details()}"}), flush=True)
            continue
        print(json.dumps({"calls": len(latencies), "elapsed": elapsed, "bytes": job.bytes,
                          "latencies": [round(x, 7) for x in latencies]}), flush=True)
    for channel in channels.values():
        await channel.close()


if __name__ == "__main__":
    asyncio.run(run())
