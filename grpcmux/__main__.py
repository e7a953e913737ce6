"""``grpcmux`` / ``python -m grpcmux``: the user command (see :mod:`grpcmux.cli`)."""

import os
import sys


def main():
    # grpc's C core logs to stderr on its own (a failed bind, say) next to our one
    # line; quiet unless the user asks for it with GRPC_VERBOSITY.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from grpcmux.cli import main as run_command

    try:
        status = run_command()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``grpcmux watch | head``): nothing left to say, and
        # the interpreter's own flush at exit must not complain about it either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    main()
