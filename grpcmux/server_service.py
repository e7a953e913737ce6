"""ServerService: the multiplexer and proxy endpoints (and metrics) as one service."""

from twisted.application.service import MultiService, Service


class ServerService(MultiService):
    """Both endpoints, stopped in the order that lets calls in flight finish.

    On stop: the multiplexer endpoint stops accepting and sends GoAway(0) to every
    client; the proxy stops taking calls and gives running ones up to the grace
    period; only then are the client sessions closed.  The metrics endpoint, if
    any, stops last, so a scrape can watch the shutdown.
    """

    def __init__(self, multiplexer, proxy, metrics_service=None):
        super().__init__()
        self.multiplexer = multiplexer
        self.proxy = proxy
        self.metrics_service = metrics_service
        # Started in this order: metrics needs nothing, and the proxy, which makes a
        # runtime directory, comes last, so a listener that cannot be had stops
        # start-up before anything is left behind.
        if metrics_service is not None:
            metrics_service.setName("metrics")
            metrics_service.setServiceParent(self)
        multiplexer.setName("multiplexer")
        multiplexer.setServiceParent(self)
        proxy.setName("proxy")
        proxy.setServiceParent(self)

    def startService(self):
        try:
            super().startService()
        except BaseException:
            self._abandon_start()
            raise

    def _abandon_start(self):
        """A listener could not be had: stop what did start (nothing waits for it)."""
        Service.stopService(self)
        for service in reversed(list(self)):
            if service.running:
                stopped = service.stopService()
                if stopped is not None:
                    stopped.addErrback(lambda _: None)  # twistd exits meanwhile

    def stopService(self):
        Service.stopService(self)
        stopped = self.multiplexer.stop_accepting()
        stopped.addCallback(lambda _: self.proxy.stopService())
        stopped.addCallback(lambda _: self.multiplexer.stopService())
        if self.metrics_service is not None:
            stopped.addCallback(lambda _: self.metrics_service.stopService())
        return stopped
