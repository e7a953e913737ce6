"""Tests for grpcmux.rpc.threads: from grpc's asyncio loop to the reactor and back."""

import threading

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from grpcmux.rpc.threads import ReactorUnavailable, await_in_reactor


def _in_thread(reactor, fn, *args, **kwargs):
    d = deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)
    return d.addTimeout(10, reactor)


def _capture(fn, *args, **kwargs):
    """Call fn; return ("ok", result) or ("error", exception)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:
        return "error", e


class _StoppedReactor:
    """Stands for a reactor that stopped after the call was handed over."""

    def __init__(self):
        self.running = True
        self.handed = []

    def callFromThread(self, fn, *args):
        self.handed.append(fn)
        self.running = False  # it will never run fn


def _run_async(coroutine_fn, *args, **kwargs):
    """Run a coroutine on a fresh asyncio loop in this (non-reactor) thread."""
    import asyncio

    async def capture():
        try:
            return "ok", await coroutine_fn(*args, **kwargs)
        except Exception as e:
            return "error", e

    return asyncio.run(capture())


@pytest_twisted.ensureDeferred
async def test_await_in_reactor_results_errors_and_timeout(reactor):
    reactor_thread = threading.current_thread()
    assert await _in_thread(reactor, _run_async, await_in_reactor, reactor,
                            threading.current_thread) == ("ok", reactor_thread)
    kind, error = await _in_thread(reactor, _run_async, await_in_reactor, reactor,
                                   lambda: 1 / 0)
    assert kind == "error" and isinstance(error, ZeroDivisionError)
    never = Deferred()
    kind, error = await _in_thread(reactor, _run_async, await_in_reactor, reactor,
                                   lambda: never, timeout=0.2)
    assert kind == "error" and isinstance(error, TimeoutError)


def test_await_in_reactor_fails_cleanly_when_reactor_stops():
    fake = _StoppedReactor()
    kind, error = _run_async(await_in_reactor, fake, lambda: None, timeout=0.2)
    assert kind == "error" and isinstance(error, ReactorUnavailable)
    fake.running = False
    kind, error = _run_async(await_in_reactor, fake, lambda: None)
    assert kind == "error" and isinstance(error, ReactorUnavailable)


@pytest_twisted.ensureDeferred
async def test_await_in_reactor_cancelled_caller_stays_cancelled(reactor):
    """A cancellation arriving with the answer is not swallowed (unlike wait_for)."""
    import asyncio

    async def cancelled_while_answered():
        task = asyncio.current_task()
        answer = Deferred()

        def answer_and_cancel():
            answer.callback("late")
            task.get_loop().call_soon_threadsafe(task.cancel)
            return answer

        try:
            await await_in_reactor(reactor, answer_and_cancel)
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    outcome = await _in_thread(reactor, lambda: asyncio.run(cancelled_while_answered()))
    assert outcome == "cancelled"
