"""Listening on an operator's address, or failing start-up with one line.

Every Twisted listener of grpcmux (multiplexer, proxy, metrics, cluster) listens
through :func:`listen`, so a taken port, a missing privilege or a bad socket path
stops start-up with one line that names the option and the address, never a
traceback, whatever holds the port.  Twisted TCP ports set SO_REUSEADDR but not
SO_REUSEPORT, so a port held by another process (grpcio's listeners included) is
refused, never shared.
"""

import errno

from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from grpcmux.addresses import server_endpoint

# What a listen error means for the operator, by errno.
_HINTS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available (no interface on this host has it)",
}


class StartupError(Exception):
    """Start-up cannot go on; ``str()`` is the one line an operator is shown."""


def listen(reactor, description, factory, option_name):
    """Listen on *description* (HOST:PORT or an endpoint string) now.

    Returns the ``IListeningPort``.  Raises :class:`StartupError` naming
    ``--<option_name>`` and the address if the port cannot be had.  Every endpoint
    grpcmux accepts (tcp, tcp6, unix, systemd) listens synchronously, which lets a
    service's ``startService`` fail before twistd reports it started.
    """
    where = f"--{option_name} {description}"
    outcome = []
    try:
        server_endpoint(reactor, description).listen(factory).addBoth(outcome.append)
    except Exception as error:  # a parser or plugin refusing the description
        raise StartupError(f"{where}: cannot listen: {_reason(error)}") from None
    if not outcome:
        raise StartupError(f"{where}: cannot listen: the endpoint did not listen at once")
    result = outcome[0]
    if isinstance(result, Failure):
        raise StartupError(f"{where}: cannot listen: {_reason(result.value)}")
    return result


def _reason(error):
    """The cause of a listen failure in a few words."""
    if isinstance(error, CannotListenError):
        error = error.socketError
    if isinstance(error, OSError) and error.errno is not None:
        return _HINTS.get(error.errno) or (error.strerror or str(error)).lower()
    if isinstance(error, (IndexError, KeyError)):  # systemd: index out of range
        return f"no such inherited socket ({error})"
    return str(error) or type(error).__name__
