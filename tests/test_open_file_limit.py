"""The server raises its soft open-file limit: every client holds two descriptors."""

import resource

from twisted.logger import LogLevel, capturedLogs

from grpcmux import open_file_limit
from grpcmux.config import ServerSettings
from grpcmux.tap.server import make_service


class FakeLimits:
    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def _patch(monkeypatch, fake):
    monkeypatch.setattr(open_file_limit.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(open_file_limit.resource, "setrlimit", fake.setrlimit)


def test_soft_limit_goes_up_to_the_hard_limit(monkeypatch):
    fake = FakeLimits(1024, 524288)
    _patch(monkeypatch, fake)
    assert open_file_limit.raise_open_file_limit() == 524288
    assert fake.limits == (524288, 524288)


def test_a_refused_raise_keeps_the_limit_and_says_so(monkeypatch):
    fake = FakeLimits(1024, 4096, refuse=True)
    _patch(monkeypatch, fake)
    with capturedLogs() as events:
        assert open_file_limit.raise_open_file_limit() == 1024
    assert fake.limits == (1024, 4096)
    [event] = events
    assert (event["log_level"], event["soft"], event["hard"]) == (LogLevel.warn, 1024, 4096)


def test_nothing_to_do_at_the_hard_limit(monkeypatch):
    fake = FakeLimits(4096, 4096, refuse=True)
    _patch(monkeypatch, fake)
    assert open_file_limit.raise_open_file_limit() == 4096


def test_the_twistd_service_raises_it(monkeypatch, reactor):
    fake = FakeLimits(1024, 8192)
    _patch(monkeypatch, fake)
    make_service(ServerSettings(), reactor)
    assert fake.limits == (8192, 8192)
