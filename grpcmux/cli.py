"""The ``grpcmux`` command line: parses it and runs the subcommand asked for.

``list`` and ``watch`` (:mod:`grpcmux.listing`) and ``call`` (:mod:`grpcmux.call`) are
plain blocking grpc clients of the proxy endpoint; ``demo`` and ``example-server``
(:mod:`grpcmux.demo`, :mod:`grpcmux.example`) run servers.  Each is imported only
when asked for, as is grpc, so ``--help`` and usage errors stay fast.

``--tls`` (implied by the other ``--tls-*`` options) reaches a proxy endpoint served
over TLS or mTLS; ``--token`` (or ``$GRPCMUX_TOKEN``) is the end-user token a proxy
with ``--proxy-auth-tokens`` wants in the ``grpcmux-token`` metadata.
``--proxy-address`` defaults to ``$GRPCMUX_PROXY_ADDRESS``, then localhost:7592.

Every problem ends in one line on stderr: exit status 2 for a usage error (including
an unusable certificate or key file, or a request that is not valid JSON), 1 for a
failure at run time (unreachable proxy, timeout, refused call).
"""

import argparse
import os
import sys

from grpcmux import __version__
from grpcmux.addresses import AddressError, check_listen_address, parse_host_port
from grpcmux.commands import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    UsageError,
)
from grpcmux.config import ServerSettings, environment_warnings, nearest
from grpcmux.ids import client_id_problem
from grpcmux.listing import TOKEN_ENV

# Where a server started with its defaults serves the proxy endpoint.
DEFAULT_PROXY_ADDRESS = ServerSettings.proxy_listener
# Where --proxy-address is read from when not given (as the server reads GRPCMUX_*).
PROXY_ADDRESS_ENV = "GRPCMUX_PROXY_ADDRESS"
DEFAULT_TIMEOUT = 10.0


def _run_list(args, out, err) -> int:
    from grpcmux import listing

    return listing.run_list(args, out, err)


def _run_watch(args, out, err) -> int:
    from grpcmux import listing

    return listing.run_watch(args, out, err)


def _run_call(args, out, err) -> int:
    from grpcmux import call

    return call.run(args, out, err)


def _run_example_server(args, out, err) -> int:
    from grpcmux import example

    return example.run(args, out, err)


def _run_token(args, out, err) -> int:
    """A fresh random token and the digest a server's --auth-tokens file lists."""
    import secrets

    from grpcmux.tokens import hash_token

    token = secrets.token_urlsafe(32)
    out.write(f"token:  {token}\ndigest: {hash_token(token)}\n")
    return EXIT_OK


def _run_demo(args, out, err) -> int:
    from grpcmux import demo

    return demo.run(args, out, err)


# Argument parsing


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as UsageError instead of printing and exiting, and
    takes whole option names only (``--proxy`` is not ``--proxy-address``).

    ``option_names`` lists its options' names, those of its argument groups
    included, for the errors that suggest one.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        self.option_names = []  # first: __init__ adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.option_names.extend(action.option_strings)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_name(*args, **kwargs):
            action = add(*args, **kwargs)
            self.option_names.extend(action.option_strings)
            return action

        group.add_argument = add_and_name
        return group

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _address_type(check):
    """An argparse ``type`` from an ``addresses`` checker, with its one-line error."""

    def checked(value: str) -> str:
        try:
            check(value)
        except AddressError as error:
            raise argparse.ArgumentTypeError(f"expected {error}, got {value!r}") from None
        return value

    return checked


_proxy_address = _address_type(parse_host_port)
_listen_address = _address_type(check_listen_address)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _client_id(value: str) -> str:
    problem = client_id_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem}, got {value!r}")
    return value


def _token(value: str) -> str:
    """A proxy token: what a gRPC metadata value may hold. The error never shows it."""
    if not value or not all(" " <= c <= "~" for c in value):
        raise argparse.ArgumentTypeError(
            f"expected a token of printable ASCII characters (from --token or ${TOKEN_ENV}); "
            "the one given is empty or has others")
    return value


def _header(value: str):
    """``-H key=value``: one metadata entry, key lowercased as HTTP/2 sends it."""
    key, equals, text = value.partition("=")
    key = key.strip().lower()
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    if key == "client-id":
        raise argparse.ArgumentTypeError("route with --client-id, not -H client-id=...")
    if key.startswith(("grpc-", ":")) or not all(c in _HEADER_KEY_CHARS for c in key):
        raise argparse.ArgumentTypeError(
            f"{key!r} is not a metadata key a caller may send (lowercase letters, digits, "
            "'-', '_', '.'; not 'grpc-...')")
    if not all(" " <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError(f"the value of {key!r} must be printable ASCII")
    return key, text


_HEADER_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _discovery_options(parser, json=True) -> None:
    """How a command reaches the proxy endpoint: address, TLS, token (and --json)."""
    parser.add_argument(
        "--proxy-address", type=_proxy_address, metavar="HOST:PORT",
        help=f"the multiplexer server's proxy endpoint (default: ${PROXY_ADDRESS_ENV}, "
             f"else {DEFAULT_PROXY_ADDRESS})")
    if json:
        parser.add_argument("--json", action="store_true",
                            help="print JSON instead of a table")
    security = parser.add_argument_group("TLS and authorization")
    security.add_argument("--tls", action="store_true",
                          help="connect over TLS (implied by the other --tls-* options)")
    security.add_argument("--tls-ca", metavar="FILE",
                          help="PEM CA certificate(s) to trust (default: the system's)")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="PEM client certificate, for a proxy requiring mTLS")
    security.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    security.add_argument("--tls-server-name", metavar="NAME",
                          help="the name the proxy's certificate must carry "
                               "(default: the host of --proxy-address)")
    security.add_argument("--token", type=_token, default=os.environ.get(TOKEN_ENV) or None,
                          help="end-user token for a proxy with --proxy-auth-tokens, sent "
                               f"as metadata grpcmux-token (default: ${TOKEN_ENV}; "
                               "prefer it: a command line is visible to other users)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="grpcmux",
        description="Inspect a grpcmux multiplexer, or try one out with 'grpcmux demo'. "
                    "The server and client themselves run under twistd: "
                    "'twistd -n grpcmux-server', 'twistd -n grpcmux-client'.",
    )
    parser.add_argument("--version", action="version", version=f"grpcmux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = commands  # for the errors that name a subcommand's options

    listing = commands.add_parser(
        "list", help="list the connected gRPC servers",
        description="List the gRPC servers connected to a multiplexer (Discovery "
                    "ListGRPCServer).")
    _discovery_options(listing)
    listing.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                         help=f"give up after S seconds (default: {DEFAULT_TIMEOUT:g})")
    listing.set_defaults(run=_run_list)

    watch = commands.add_parser(
        "watch", help="follow gRPC servers connecting, disconnecting and changing health",
        description="Print one line per connect, disconnect and health change "
                    "(Discovery WatchGRPCServer) until Ctrl-C.")
    _discovery_options(watch)
    watch.add_argument("--no-replay", dest="replay", action="store_false",
                       help="do not start with the servers connected already")
    watch.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                       help="give up if the proxy does not answer within S seconds "
                            f"(default: {DEFAULT_TIMEOUT:g}); the watch itself runs on")
    watch.set_defaults(run=_run_watch)

    call = commands.add_parser(
        "call", help="call a method of a connected gRPC server, in JSON",
        description="Call SERVICE/METHOD of the gRPC server behind client --client-id, "
                    "through the proxy; its types come from the server's reflection "
                    "service. Replies are printed as JSON, one object per line. Client "
                    "and bidirectional streaming methods take a JSON array or several "
                    "JSON objects.")
    call.add_argument("method", nargs="?", metavar="SERVICE/METHOD",
                      help="the method to call, e.g. grpcmux.v1.DemoService/Hello")
    call.add_argument("--client-id", type=_client_id,
                      help="the client whose gRPC server to call (default: the proxy's "
                           "own routing: --default-client-id or :authority)")
    call.add_argument("-d", "--data", metavar="JSON",
                      help="the request in JSON (default: {}); @FILE reads a file, "
                           "- reads standard input")
    call.add_argument("-H", "--header", dest="headers", type=_header, action="append",
                      default=[], metavar="KEY=VALUE", help="metadata to send (repeatable)")
    call.add_argument("--list", action="store_true",
                      help="list the services the gRPC server offers, then exit")
    call.add_argument("--describe", metavar="NAME",
                      help="describe a service (or message type) of the gRPC server")
    call.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                      help=f"give up after S seconds, reflection included "
                           f"(default: {DEFAULT_TIMEOUT:g})")
    _discovery_options(call, json=False)
    call.set_defaults(run=_run_call)

    example = commands.add_parser(
        "example-server", help="serve the example gRPC service (health, reflection on)",
        description="Serve grpcmux.v1.DemoService, with grpc.health.v1 and server "
                    "reflection, on --listen until Ctrl-C or SIGTERM: a gRPC server to "
                    "put behind 'twistd grpcmux-client' and call with 'grpcmux call'.")
    example.add_argument("--listen", type=_listen_address, default="127.0.0.1:50051",
                         metavar="HOST:PORT", help="where to listen (default: 127.0.0.1:50051)")
    example.add_argument("--name", default="example",
                         help="the server name its replies carry (default: example)")
    example.set_defaults(run=_run_example_server)

    demo = commands.add_parser(
        "demo", help="run server, proxy, client and an example gRPC server; call it",
        description="Start a multiplexer server with its proxy endpoint, an example "
                    "gRPC server and a multiplexer client in front of it, all in this "
                    "process on loopback; call the example through the proxy, show the "
                    "Discovery listing, print the equivalent commands, and exit.")
    demo.add_argument("--client-id", type=_client_id, default="demo",
                      help="id of the demo client (default: demo)")
    demo.add_argument("--name", default="world", help="who the example greets")
    demo.add_argument("--multiplexer-listener", type=_listen_address, default="127.0.0.1:0",
                      metavar="HOST:PORT",
                      help="multiplexer endpoint (default: 127.0.0.1:0, a free port)")
    demo.add_argument("--proxy-listener", type=_listen_address, default="127.0.0.1:0",
                      metavar="HOST:PORT",
                      help="proxy endpoint (default: 127.0.0.1:0, a free port)")
    demo.add_argument("--timeout", type=_seconds, default=20.0, metavar="S",
                      help="give up on any step after S seconds (default: 20)")
    demo.add_argument("--keep-running", action="store_true",
                      help="after the call, keep everything up until Ctrl-C, to try "
                           "the printed commands")
    demo.add_argument("--verbose", action="store_true", help="log to stderr (grpc's own log: set GRPC_VERBOSITY=INFO too)")
    demo.set_defaults(run=_run_demo)

    token = commands.add_parser(
        "token", help="print a fresh random token and its SHA-256 digest",
        description="Print a new random token (for the client's --token-file) and its "
                    "SHA-256 digest (for the server's --auth-tokens file).")
    token.set_defaults(run=_run_token)
    return parser


def _proxy_address_from(environ, command: str) -> str:
    """--proxy-address when not given: $GRPCMUX_PROXY_ADDRESS, else the default."""
    value = environ.get(PROXY_ADDRESS_ENV)
    if not value:
        return DEFAULT_PROXY_ADDRESS
    try:
        parse_host_port(value)
    except AddressError as error:
        raise UsageError(f"grpcmux {command}: environment variable {PROXY_ADDRESS_ENV}: "
                         f"expected {error}, got {value!r}") from None
    return value


def _unrecognized(parser, args, extra) -> UsageError:
    """The error for arguments argparse left over, named after the subcommand (which
    argparse does not do), with the nearest option of that subcommand."""
    command = parser.commands.choices[args.command]
    names = command.option_names
    first = extra[0].partition("=")[0]
    close = nearest(first, names) if first.startswith("--") else None
    hint = f"; did you mean {close}?" if close else ""
    return UsageError(f"grpcmux {args.command}: unrecognized arguments: {' '.join(extra)}"
                      f"{hint} (see 'grpcmux {args.command} --help')")


def run(argv, out, err, environ=None) -> int:
    """Run the command line ``argv`` (without the program name); the exit status.

    *environ* (default ``os.environ``) supplies ``$GRPCMUX_PROXY_ADDRESS``; every
    GRPCMUX_* variable no grpcmux program reads is warned about on *err*.
    """
    environ = os.environ if environ is None else environ
    try:
        parser = make_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unrecognized(parser, args, extra)
        if getattr(args, "proxy_address", "") is None:
            args.proxy_address = _proxy_address_from(environ, args.command)
    except UsageError as error:
        err.write(f"{error}\n")
        return EXIT_USAGE
    except SystemExit as done:  # --help, --version
        return done.code or EXIT_OK
    for warning in environment_warnings(environ):
        err.write(f"grpcmux: warning: {warning}\n")
    try:
        return args.run(args, out, err)
    except UsageError as error:  # found once the command runs (a bad certificate file)
        err.write(f"{error}\n")
        return EXIT_USAGE
    except CommandFailed as error:
        err.write(f"grpcmux {args.command}: {error}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else EXIT_INTERRUPTED


def main(argv=None) -> int:
    return run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr)
