"""The process's open-file limit, raised at start as Go programs do.

Each connected client holds a descriptor in the server, each caller another, so the
usual soft limit of 1,024 would turn clients away early while the hard limit (often
524,288 under systemd) allows far more.
"""

import resource

from twisted.logger import Logger

_log = Logger(namespace="grpcmux.open_file_limit")


def raise_open_file_limit():
    """Raise the soft limit on open files to the hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        _log.warn("cannot raise the open-file limit from {soft} to {hard}: {error}",
                  soft=soft, hard=hard, error=error)
        return soft
    _log.info("open-file limit raised from {soft} to {hard} (one per client and per caller)",
              soft=soft, hard=hard)
    return hard
