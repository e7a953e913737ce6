"""Shared pytest fixtures: the reactor, and guards against hidden failures.

Every test fails if it logs an unhandled error (a ``log_failure`` event, e.g. an
unhandled error in a Deferred, or a legacy ``isError`` event) or leaves delayed
calls on the global reactor.  A test that expects logged errors takes the
``logged_errors`` fixture, checks the list and clears it.
"""

import gc
import sys

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher


@pytest.fixture
def reactor():
    """The global reactor (pytest-twisted installs it; imported here, never at import time)."""
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest_twisted.async_yield_fixture
async def stack(reactor, tmp_path):
    """A whole grpcmux on loopback in this process: see ``tests/mux_stack.py``."""
    from mux_stack import Stack

    s = Stack(reactor, tmp_path)
    yield s
    await s.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Test certificates (``tests/certs.py``), made once per test module."""
    from certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def log_events():
    """Every event logged during the test, as logged."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _is_error(event):
    return "log_failure" in event or bool(event.get("isError"))


@pytest.fixture(autouse=True)
def logged_errors():
    """Errors logged during the test; any left in the list fail the test."""
    errors = []

    def observer(event):
        if _is_error(event):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
        gc.collect()  # unhandled errors in garbage Deferreds are logged on collection
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors:
        descriptions = []
        for event in errors:
            failure = event.get("log_failure")
            text = failure.getTraceback() if failure is not None else repr(event)
            descriptions.append(text)
        pytest.fail("unhandled errors were logged:\n" + "\n".join(descriptions))


@pytest.fixture(autouse=True)
def no_leftover_delayed_calls():
    """Fail (and clean up) when a test leaves delayed calls on the global reactor."""
    yield
    if "twisted.internet.reactor" not in sys.modules:
        return
    from twisted.internet import reactor as global_reactor

    leftover = [call for call in global_reactor.getDelayedCalls() if call.active()]
    for call in leftover:
        call.cancel()
    if leftover:
        pytest.fail("test left delayed calls on the reactor: " + ", ".join(map(str, leftover)))
