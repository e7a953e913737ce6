"""Tests for grpcmux.rpc.threads: crossing between grpc threads and the reactor."""

import threading

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool

from grpcmux.rpc.threads import ReactorUnavailable, call_in_reactor, defer_to_thread


def _in_thread(reactor, fn, *args, **kwargs):
    d = deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)
    return d.addTimeout(10, reactor)


def _capture(fn, *args, **kwargs):
    """Call fn; return ("ok", result) or ("error", exception)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:
        return "error", e


@pytest_twisted.ensureDeferred
async def test_call_in_reactor_runs_on_reactor_thread(reactor):
    reactor_thread = threading.current_thread()
    outcome = await _in_thread(
        reactor, call_in_reactor, reactor, lambda a, b: (threading.current_thread(), a + b),
        1, b=2)
    assert outcome == (reactor_thread, 3)


@pytest_twisted.ensureDeferred
async def test_call_in_reactor_waits_for_deferred_and_raises_errors(reactor):
    assert await _in_thread(reactor, call_in_reactor, reactor, succeed, "d") == "d"
    kind, error = await _in_thread(reactor, _capture, call_in_reactor, reactor, lambda: 1 / 0)
    assert kind == "error" and isinstance(error, ZeroDivisionError)


@pytest_twisted.ensureDeferred
async def test_call_in_reactor_times_out(reactor):
    never = Deferred()
    kind, error = await _in_thread(
        reactor, _capture, call_in_reactor, reactor, lambda: never, timeout=0.2)
    assert kind == "error" and isinstance(error, TimeoutError)


class _StoppedReactor:
    """Stands for a reactor that stopped after the call was handed over."""

    def __init__(self):
        self.running = True
        self.handed = []

    def callFromThread(self, fn, *args):
        self.handed.append(fn)
        self.running = False  # it will never run fn


def test_call_in_reactor_fails_cleanly_when_reactor_stops():
    fake = _StoppedReactor()
    with pytest.raises(ReactorUnavailable):
        call_in_reactor(fake, lambda: None, timeout=30)
    assert len(fake.handed) == 1


def test_call_in_reactor_refuses_when_reactor_not_running():
    fake = _StoppedReactor()
    fake.running = False
    with pytest.raises(ReactorUnavailable):
        call_in_reactor(fake, lambda: None)
    assert fake.handed == []


@pytest_twisted.ensureDeferred
async def test_defer_to_thread_runs_off_the_reactor(reactor):
    reactor_thread = threading.current_thread()
    ran_on = await defer_to_thread(reactor, threading.current_thread).addTimeout(10, reactor)
    assert ran_on is not reactor_thread
