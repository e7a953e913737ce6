"""grpcmux.server_service: the order in which the endpoints start and stop."""

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from grpcmux.server_service import ServerService


class Recorded(Service):
    """A service that writes what happens to it into ``log``."""

    def __init__(self, log, name, fails=False):
        self.log = log
        self.label = name
        self.fails = fails
        self.stopped = Deferred()

    def startService(self):
        if self.fails:
            raise OSError(f"{self.label}: cannot listen")
        super().startService()
        self.log.append(f"{self.label} started")

    def stopService(self):
        super().stopService()
        self.log.append(f"{self.label} stopping")
        return self.stopped


class Multiplexer(Recorded):
    def stop_accepting(self):
        self.log.append("multiplexer stops accepting")
        return succeed(None)


def services(fail=None):
    log = []
    multiplexer = Multiplexer(log, "multiplexer", fails=fail == "multiplexer")
    proxy = Recorded(log, "proxy", fails=fail == "proxy")
    metrics = Recorded(log, "metrics")
    return log, ServerService(multiplexer, proxy, metrics), multiplexer, proxy, metrics


def test_start_order_is_metrics_multiplexer_proxy():
    log, service, *_ = services()
    service.startService()
    assert log == ["metrics started", "multiplexer started", "proxy started"]


def test_the_proxy_drains_before_client_sessions_close_and_metrics_stop_last():
    log, service, multiplexer, proxy, metrics = services()
    service.startService()
    del log[:]
    done = []
    service.stopService().addCallback(done.append)
    assert log == ["multiplexer stops accepting", "proxy stopping"]
    proxy.stopped.callback(None)
    assert log[-1] == "multiplexer stopping" and not done
    multiplexer.stopped.callback(None)
    assert log[-1] == "metrics stopping" and not done
    metrics.stopped.callback(None)
    assert done


def test_a_listener_that_cannot_be_had_stops_what_did_start():
    log, service, multiplexer, proxy, metrics = services(fail="proxy")
    with pytest.raises(OSError, match="proxy: cannot listen"):
        service.startService()
    assert log == ["metrics started", "multiplexer started",
                   "multiplexer stopping", "metrics stopping"]
    assert not service.running
