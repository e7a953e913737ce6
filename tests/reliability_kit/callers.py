"""Callers through the proxy, seen from the reactor: streaming calls and load.

``HeldStreams``: calls that exchange checked messages and then stay open (each
in its own thread with the blocking grpc API) until the test ends them or a
fault does; the reactor learns when they are established and how each ended.

``run_load``: many concurrent calls from one grpc.aio event loop in one
thread, every byte checked.  Blocking grpc code never runs on the reactor.
"""

import asyncio
import hashlib
import queue
import threading
import time

import grpc
from twisted.internet.defer import Deferred, DeferredList

from reliability_kit.pattern import SERVICE, chunk, echo_payload
from rpc_backend import UNLIMITED, in_thread, route

ROUNDS = 8  # checked echo round trips before a held stream counts as established


class Outcome:
    """How one call ended: status code, details, when (monotonic), bytes checked."""

    def __init__(self, code, details, ended, checked, error=None):
        self.code = code
        self.details = details
        self.ended = ended
        self.checked = checked
        self.error = error  # a mismatch found in the echoed bytes, if any


class HeldStreams:
    """``count`` Bidi calls to ``client_id``, held open once established."""

    def __init__(self, reactor, proxy_address, client_id, count, timeout=30.0):
        self.reactor = reactor
        self.client_id = client_id
        self.channel = grpc.insecure_channel(proxy_address, options=UNLIMITED)
        self._requests = [queue.Queue() for _ in range(count)]
        self.established = [Deferred() for _ in range(count)]
        self.ended = [Deferred() for _ in range(count)]
        for index in range(count):
            threading.Thread(target=self._run, args=(index, timeout), daemon=True,
                             name=f"held-stream-{index}").start()

    def when_established(self, timeout=30.0):
        return DeferredList(self.established, fireOnOneErrback=True,
                            consumeErrors=True).addTimeout(timeout, self.reactor)

    def when_ended(self, timeout=30.0):
        """Fires with the list of Outcomes once every call has ended."""
        d = DeferredList(self.ended, consumeErrors=True).addTimeout(timeout, self.reactor)
        return d.addCallback(lambda results: [value for _, value in results])

    def finish(self, rounds=0):
        """End the calls cleanly: ``rounds`` more checked echo round trips each, then
        the caller half-closes and the echo ends."""
        for index, requests in enumerate(self._requests):
            for round_ in range(ROUNDS, ROUNDS + rounds):
                requests.put(echo_payload(index, round_))
            requests.put(None)

    def close(self):
        self.finish()
        self.channel.close()

    def _run(self, index, timeout):
        requests = self._requests[index]
        call = self.channel.stream_stream(f"/{SERVICE}/Bidi")(
            iter(requests.get, None), metadata=route(self.client_id), timeout=timeout)
        checked = 0
        error = None
        try:
            for round_ in range(ROUNDS):
                payload = echo_payload(index, round_)
                requests.put(payload)
                answer = next(call)
                if answer != payload:
                    error = f"call {index} round {round_}: echo differs"
                checked += len(answer)
            self.reactor.callFromThread(self.established[index].callback, index)
            # Nothing more is sent until finish(rounds): this waits for the end.
            for round_, answer in enumerate(call, ROUNDS):
                if answer != echo_payload(index, round_):
                    error = error or f"call {index} round {round_}: unexpected message"
                checked += len(answer)
        except grpc.RpcError:
            pass
        except StopIteration:
            pass
        ended = time.monotonic()
        outcome = Outcome(call.code(), call.details(), ended, checked, error)

        def report():
            if not self.established[index].called:
                self.established[index].errback(
                    AssertionError(f"stream {index} ended before it was established: "
                                   f"{outcome.code} {outcome.details}"))
            self.ended[index].callback(outcome)

        self.reactor.callFromThread(report)


def probe(proxy_address, client_id, timeout=2.0):
    """One unary echo call (blocking): (StatusCode, details, seconds taken)."""
    channel = grpc.insecure_channel(proxy_address, options=UNLIMITED)
    started = time.monotonic()
    try:
        payload = b"probe:" + client_id.encode()
        answer = channel.unary_unary(f"/{SERVICE}/Unary")(
            payload, metadata=route(client_id), timeout=timeout)
        code = grpc.StatusCode.OK if answer == payload else grpc.StatusCode.DATA_LOSS
        return code, "", time.monotonic() - started
    except grpc.RpcError as error:
        return error.code(), error.details(), time.monotonic() - started
    finally:
        channel.close()


class PacedReader:
    """Reads a ``Flood`` stream in a thread, one chunk per permit from the reactor.

    ``allow(n)`` lets it read ``n`` more chunks, ``unpace()`` lets it read freely;
    every chunk is compared with the pattern and hashed.  ``received`` is read by
    the reactor (an int rebinding, so a consistent value).
    """

    def __init__(self, reactor, proxy_address, client_id, total, timeout=300.0):
        self.reactor = reactor
        self.received = 0
        self.chunks = 0
        self.digest = hashlib.sha256()
        self.error = None
        self._permits = threading.Semaphore(0)
        self._paced = True
        self.channel = grpc.insecure_channel(proxy_address, options=UNLIMITED)
        self.call = self.channel.unary_stream(f"/{SERVICE}/Flood")(
            str(total).encode(), metadata=route(client_id), timeout=timeout)
        self.ended = Deferred()
        threading.Thread(target=self._run, daemon=True, name="paced-reader").start()

    def allow(self, chunks):
        for _ in range(chunks):
            self._permits.release()

    def unpace(self):
        self._paced = False
        self._permits.release()

    def stop(self):
        """Cancel the call (the caller has read enough)."""
        self.call.cancel()
        self.unpace()

    def _run(self):
        try:
            while True:
                if self._paced:
                    self._permits.acquire()
                message = next(self.call)
                if message != chunk(self.chunks):
                    self.error = self.error or f"chunk {self.chunks} differs"
                self.digest.update(message)
                self.chunks += 1
                self.received += len(message)
        except (grpc.RpcError, StopIteration):
            pass
        code = self.call.code()
        self.reactor.callFromThread(self.ended.callback, code)

    def close(self):
        self.stop()
        self.channel.close()


# -- load from one asyncio loop ----------------------------------------------------


class LoadResult:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.failures = {}  # (code, details) -> count
        self.bytes_checked = 0
        self.seconds = 0.0

    def fail(self, code, details):
        self.failed += 1
        key = (code, details)
        self.failures[key] = self.failures.get(key, 0) + 1


async def _unary(channel, client_id, index, result):
    payload = echo_payload(index, 0, 64)
    try:
        answer = await channel.unary_unary(f"/{SERVICE}/Unary")(
            payload, metadata=route(client_id), timeout=60.0)
    except grpc.RpcError as error:
        result.fail(error.code(), error.details())
        return
    if answer != payload:
        result.fail("DATA_LOSS", "echo differs")
        return
    result.ok += 1
    result.bytes_checked += len(answer)


async def _bidi(channel, client_id, index, result, messages, size):
    """A streaming call: ``messages`` echoes, each checked; the digests compared."""
    sent = hashlib.sha256()
    received = hashlib.sha256()
    call = channel.stream_stream(f"/{SERVICE}/Bidi")(metadata=route(client_id), timeout=120.0)
    try:
        for number in range(messages):
            payload = echo_payload(index, number, size)
            sent.update(payload)
            await call.write(payload)
            answer = await call.read()
            if answer is grpc.aio.EOF:
                break
            received.update(answer)
            result.bytes_checked += len(answer)
        await call.done_writing()
        await call.read()  # EOF
    except grpc.RpcError as error:
        result.fail(error.code(), error.details())
        return
    if sent.digest() != received.digest():
        result.fail("DATA_LOSS", "stream digest differs")
        return
    result.ok += 1


async def _load(proxy_address, calls, concurrency):
    result = LoadResult()
    started = time.monotonic()
    async with grpc.aio.insecure_channel(proxy_address, options=UNLIMITED) as channel:
        pending = iter(calls)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(call):
            async with semaphore:
                await call(channel, result)

        await asyncio.gather(*(one(call) for call in pending))
    result.seconds = time.monotonic() - started
    return result


def unary_calls(client_ids):
    """One checked unary call per id."""
    return [lambda channel, result, i=i, c=c: _unary(channel, c, i, result)
            for i, c in enumerate(client_ids)]


def repeated_unary_calls(client_ids, total):
    """``total`` checked unary calls spread round-robin over ``client_ids``."""
    return [lambda channel, result, i=i: _unary(channel, client_ids[i % len(client_ids)],
                                                 i, result)
            for i in range(total)]


def bidi_calls(client_id, count, messages=4, size=1024):
    """``count`` streaming calls to one client, ``messages`` echoes each."""
    return [lambda channel, result, i=i: _bidi(channel, client_id, i, result, messages,
                                                size)
            for i in range(count)]


def run_load(reactor, proxy_address, calls, concurrency, timeout=300.0):
    """Run ``calls`` (from the builders above) in a thread; a Deferred of LoadResult."""
    return in_thread(reactor, asyncio.run, _load(proxy_address, calls, concurrency),
                     wait=timeout)
