"""Crossing between the reactor thread and the grpc threads.

grpc's asyncio loop -> reactor: fire and forget with ``reactor.callFromThread``; when
the loop needs the result, :func:`await_in_reactor` waits with a timeout and gives up
once the reactor is no longer running (``blockingCallFromThread`` would hang forever
then).

Reactor -> grpc: only immutable values (the registry snapshot) and thread-safe
handoffs (``loop.call_soon_threadsafe``) cross; the reactor never waits for the loop.
"""

import asyncio

from twisted.internet.defer import maybeDeferred


class ReactorUnavailable(RuntimeError):
    """The reactor stopped (or never ran) before it could answer."""


async def await_in_reactor(reactor, fn, *args, timeout=5.0):
    """From an asyncio loop: run ``fn(*args)`` on the reactor and await its result.

    Raises what ``fn`` raised, ``TimeoutError`` after ``timeout`` seconds, or
    :class:`ReactorUnavailable` once the reactor is not running. If the answer comes
    after the caller gave up, it is dropped: ``fn`` must tolerate that.
    """
    if not reactor.running:
        raise ReactorUnavailable("the reactor is not running")
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(method, value):  # on the loop
        if not future.done():
            method(value)

    def deliver(method, value):  # on the reactor
        try:
            loop.call_soon_threadsafe(settle, method, value)
        except RuntimeError:
            pass  # the loop is closed; nobody waits any more

    def run():
        d = maybeDeferred(fn, *args)
        d.addCallbacks(lambda r: deliver(future.set_result, r),
                       lambda f: deliver(future.set_exception, f.value))

    def expire():  # on the loop
        if reactor.running:
            settle(future.set_exception,
                   TimeoutError(f"the reactor did not answer within {timeout} s"))
        else:
            settle(future.set_exception, ReactorUnavailable("the reactor stopped"))

    reactor.callFromThread(run)
    # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
    # comes as the answer arrives, and a cancelled call must end.
    timer = loop.call_later(timeout, expire)
    try:
        return await future
    finally:
        timer.cancel()
