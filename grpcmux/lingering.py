"""Connections of closed client sessions that are still closing.

A polite close waits until the peer has read what is buffered; a peer that never
reads would keep its connection (and the descriptor) for ever.  Each such transport
gets a deadline, after which it is aborted.  Only the transport is kept: Twisted
drops its protocol (the whole session) once the connection is really closed, so a
client that closed cleanly costs nothing meanwhile.
"""

from twisted.logger import Logger


class LingeringTransports:
    """Transports of closed sessions, each aborted unless it is gone in time."""

    _log = Logger()

    def __init__(self, clock):
        self._clock = clock
        self._calls = {}  # transport -> its abort call
        self._stopped = False

    def __len__(self):
        return len(self._calls)

    def linger(self, transport, remote_address, seconds):
        """Abort ``transport`` unless it is gone in ``seconds`` (once stopped: nothing
        is watched, the process's exit closes what is left)."""
        if not self._stopped:
            self._calls[transport] = self._clock.callLater(
                seconds, self._abort, transport, remote_address, seconds)

    def gone(self, transport):
        """``transport`` closed by itself: forget it."""
        call = self._calls.pop(transport, None)
        if call is not None and call.active():
            call.cancel()

    def abort_all(self):
        """Abort every lingering transport now, and watch no new ones."""
        self._stopped = True
        for transport in list(self._calls):
            self._abort(transport)

    def _abort(self, transport, remote_address=None, seconds=None):
        call = self._calls.pop(transport)
        if call.active():
            call.cancel()
        if transport.connected:
            if seconds is not None:
                self._log.warn(
                    "connection from {remote_address} still open {seconds:g} s after "
                    "its session closed (the peer reads nothing); aborting it",
                    remote_address=remote_address, seconds=seconds)
            transport.abortConnection()
