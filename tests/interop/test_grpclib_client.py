"""grpclib as the caller: an asyncio gRPC client on the ``h2`` library, not grpcio.

The router must not depend on how grpcio frames HTTP/2; grpclib orders, splits and
windows its frames its own way. Each call kind, metadata both ways, statuses,
deadlines and cancellation go through the proxy to a client's backend.
"""

import asyncio

import pytest_twisted
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from rpc_backend import SERVICE

LAB = {"client-id": "lab"}
CALL_TIMEOUT = 10.0


class RawCodec(CodecBase):
    """Messages as bytes, like the test backend's."""

    __content_subtype__ = "proto"

    def encode(self, message, message_type):
        return message

    def decode(self, data, message_type):
        return data


def run(port, scenario):
    """Run ``scenario(channel)`` on a fresh grpclib channel in its own event loop."""

    async def main():
        channel = Channel("127.0.0.1", port, codec=RawCodec())
        try:
            return await asyncio.wait_for(scenario(channel), CALL_TIMEOUT)
        finally:
            channel.close()

    return asyncio.run(main())


def method(name):
    return f"/{SERVICE}/{name}"


async def unary(channel, request, metadata=LAB, timeout=None):
    async with channel.request(method("Unary"), Cardinality.UNARY_UNARY, None, None,
                               metadata=metadata, timeout=timeout) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
        await stream.recv_trailing_metadata()
        return reply, dict(stream.initial_metadata or {}), dict(stream.trailing_metadata or {})


def in_thread(stack, scenario):
    return stack.in_thread(run, stack.proxy.port, scenario)


@pytest_twisted.ensureDeferred
async def test_grpclib_unary_with_metadata_both_ways(stack):
    await stack.connected_client("lab")
    reply, headers, trailers = await in_thread(stack, lambda ch: unary(
        ch, b"ping", {**LAB, "x-header-h": "v", "x-trailer-t": "w"}))
    assert reply == b"ping"
    assert headers.get("h") == "v" and trailers.get("t") == "w"
    record = stack.backend.next_call()
    assert "client-id" not in dict(record.metadata)


@pytest_twisted.ensureDeferred
async def test_grpclib_server_client_and_bidi_streams(stack):
    await stack.connected_client("lab")

    async def streams(channel):
        async with channel.request(method("ServerStream"), Cardinality.UNARY_STREAM, None,
                                   None, metadata={**LAB, "x-count": "3"}) as stream:
            await stream.send_message(b"s" * 70000, end=True)
            served = [m async for m in stream]
        async with channel.request(method("ClientStream"), Cardinality.STREAM_UNARY, None,
                                   None, metadata=LAB) as stream:
            for part in (b"a", b"b", b"c"):
                await stream.send_message(part)
            await stream.end()
            joined = await stream.recv_message()
        async with channel.request(method("Bidi"), Cardinality.STREAM_STREAM, None, None,
                                   metadata=LAB) as stream:
            echoed = []
            for part in (b"x", b"y"):
                await stream.send_message(part)
                echoed.append(await stream.recv_message())
            await stream.end()
        return served, joined, echoed

    served, joined, echoed = await in_thread(stack, streams)
    assert served == [b"s" * 70000] * 3
    assert joined == b"a|b|c"
    assert echoed == [b"x", b"y"]


async def status_of(call):
    try:
        await call
    except GRPCError as error:
        return error.status, error.message
    except asyncio.TimeoutError:  # grpclib's own deadline, after it reset the stream
        return Status.DEADLINE_EXCEEDED, None
    return Status.OK, None


@pytest_twisted.ensureDeferred
async def test_grpclib_sees_backend_and_router_statuses(stack):
    await stack.connected_client("lab")

    async def statuses(channel):
        return (
            await status_of(unary(channel, b"x", {**LAB, "x-fail": "NOT_FOUND nope"})),
            await status_of(unary(channel, b"x", {"client-id": "nobody"})),
            await status_of(unary(channel, b"x", {})),
        )

    backend, unknown, unrouted = await in_thread(stack, statuses)
    assert backend == (Status.NOT_FOUND, "nope")
    assert unknown == (Status.NOT_FOUND, "client 'nobody' is not connected")
    assert unrouted[0] == Status.INVALID_ARGUMENT


@pytest_twisted.ensureDeferred
async def test_grpclib_deadline_and_cancellation_reach_the_backend(stack):
    await stack.connected_client("lab")
    waiting = {**LAB, "x-wait": "1"}

    async def expire(channel):
        return await status_of(unary(channel, b"x", waiting, timeout=0.5))

    code, _ = await in_thread(stack, expire)
    assert code == Status.DEADLINE_EXCEEDED
    record = stack.backend.next_call()
    assert await stack.in_thread(record.settled.wait, 10)
    assert record.outcome == "deadline"

    async def cancel(channel):
        async with channel.request(method("Bidi"), Cardinality.STREAM_STREAM, None, None,
                                   metadata=waiting) as stream:
            await stream.send_message(b"r")
            # Cancel only once the backend has the call (the queue blocks: not on the loop).
            seen = await asyncio.get_running_loop().run_in_executor(
                None, stack.backend.next_call, CALL_TIMEOUT)
            await stream.cancel()
            return seen

    record = await in_thread(stack, cancel)
    assert await stack.in_thread(record.settled.wait, 10)
    assert record.outcome == "cancelled"
