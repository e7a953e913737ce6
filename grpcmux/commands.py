"""What every ``grpcmux`` subcommand shares: its two errors and its exit statuses.

A module of its own so that the subcommand modules (``demo``, ``call``, ``example``)
and the argument parser in ``cli`` need not import each other.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class CommandFailed(Exception):
    """The command could not do its job; the message is the one line to show."""


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines included) folded to single spaces."""
    return " ".join(text.split())
