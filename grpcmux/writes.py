"""What is written while one read is handled is sent when that read ends.

A Twisted TCP transport sends in the reactor's next turn: ``write()`` buffers and
registers the socket for writability, and the reactor sends once epoll reports it.
A router or a tunnel answers nearly every read with writes to *other* connections,
so each hop of a call paid one more reactor turn per send (two ``epoll_ctl``, one
``epoll_wait``, a dispatch) before its bytes moved on.  ``BATCH`` sends them at the
end of the read instead: still one send per connection written to, as Twisted's
own coalescing gives, one turn earlier.

Readers (the yamux session, an HTTP/2 connection, a splice end) decorate their
``dataReceived`` with :func:`batched`; writers
report the transports they wrote with :meth:`WriteBatch.wrote`.  Only socket
transports (Twisted ``FileDescriptor``) are sent early; anything else (TLS, a yamux
stream, a test's ``StringTransport``) is left alone: its bytes reach a socket
transport that is.  Writes outside a read (timers, a resumed producer) take
Twisted's usual path.
"""

import functools

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger


class WriteBatch:
    """The reads in progress (nested: a yamux stream's protocol reads inside its
    session's read) and the socket transports written since the outermost began."""

    _log = Logger()

    def __init__(self):
        self._depth = 0
        self._written = {}  # transport -> None: a set in the order written
        self._before_send = []  # callables run as the batch ends, before its sends

    @property
    def active(self):
        """True while a read is being handled."""
        return self._depth > 0

    def begin(self):
        self._depth += 1

    def end(self):
        """One read is handled; at the outermost, run what waits and send."""
        self._depth -= 1
        if self._depth:
            return
        while self._before_send or self._written:
            if self._before_send:
                self._depth = 1  # what these write joins this batch
                try:
                    callbacks, self._before_send = self._before_send, []
                    for callback in callbacks:
                        try:
                            callback()
                        except Exception:
                            self._log.failure("write batch: {callback} failed",
                                              callback=callback)
                finally:
                    self._depth = 0
            written, self._written = self._written, {}
            for transport in written:
                send_now(transport)

    def wrote(self, transport):
        """``transport`` was written to: send it when the batch ends, if it is a socket."""
        if self._depth and transport not in self._written and isinstance(
                transport, FileDescriptor):
            self._written[transport] = None

    def before_send(self, callback):
        """Call ``callback()`` when the batch ends, before it sends (only while active)."""
        self._before_send.append(callback)


def send_now(transport):
    """Send what ``transport`` buffered, as the reactor would once it is writable.

    A transport that is closing is left to the reactor, which closes it once its
    buffer is out; one whose send failed stays registered for writing, so the
    reactor's next attempt meets the error and closes it.
    """
    if transport.connected and not transport.disconnecting and not transport.disconnected:
        if transport.doWrite() is not None:
            transport.startWriting()


#: The process's batch: there is one reactor, and one read is handled at a time.
BATCH = WriteBatch()


def batched(data_received):
    """Decorate a protocol's ``dataReceived``: what it writes to sockets goes out as it
    returns (or as the outermost read it is nested in returns)."""
    @functools.wraps(data_received)
    def handle(self, data):
        BATCH.begin()
        try:
            return data_received(self, data)
        finally:
            BATCH.end()
    return handle
