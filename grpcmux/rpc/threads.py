"""Crossing between the reactor thread and the grpc threads.

grpc thread -> reactor: fire and forget with ``reactor.callFromThread``; when the
grpc side needs the result, :func:`call_in_reactor` (threads) or
:func:`await_in_reactor` (asyncio) waits with a timeout and gives up once the reactor
is no longer running (``blockingCallFromThread`` would hang forever then).

Reactor -> grpc: only immutable values (the registry snapshot) and thread-safe
handoffs (queues, ``loop.call_soon_threadsafe``) cross; the reactor never waits for
a grpc thread: blocking grpc work goes to :func:`defer_to_thread`.
"""

import asyncio
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout

from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool

# How often a waiting grpc thread checks that the reactor still runs.
_POLL_INTERVAL = 0.1


class ReactorUnavailable(RuntimeError):
    """The reactor stopped (or never ran) before it could answer."""


def call_in_reactor(reactor, fn, *args, timeout=5.0, **kwargs):
    """Run ``fn(*args, **kwargs)`` on the reactor thread and return its result.

    For grpc threads only. A Deferred result is waited for. Raises what ``fn``
    raised, ``TimeoutError`` after ``timeout`` seconds, or :class:`ReactorUnavailable`
    once the reactor is not running.
    """
    if not reactor.running:
        raise ReactorUnavailable("the reactor is not running")
    future = Future()

    def run():
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up already
        d = maybeDeferred(fn, *args, **kwargs)
        d.addCallbacks(future.set_result, lambda f: future.set_exception(f.value))

    reactor.callFromThread(run)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            future.cancel()
            raise TimeoutError(f"the reactor did not answer within {timeout} s")
        try:
            return future.result(min(remaining, _POLL_INTERVAL))
        except _FutureTimeout:
            if not reactor.running:
                future.cancel()
                raise ReactorUnavailable("the reactor stopped") from None


async def await_in_reactor(reactor, fn, *args, timeout=5.0):
    """From an asyncio loop: run ``fn(*args)`` on the reactor and await its result.

    Like :func:`call_in_reactor`, without blocking the loop. If the answer comes
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


def defer_to_thread(reactor, fn, *args, **kwargs):
    """Run blocking grpc work (waits, channel closes) off the reactor; a Deferred."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)
