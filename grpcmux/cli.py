"""The ``grpcmux`` command: list and watch connected clients, run a demo, make a token.

``list`` and ``watch`` are plain blocking grpc clients of the proxy endpoint's
Discovery API; no reactor runs for them.  ``demo`` lives in :mod:`grpcmux.demo` and
is imported only when asked for, as is grpc for the other commands, so ``--help``
and usage errors stay fast.

``--tls`` (implied by the other ``--tls-*`` options) reaches a proxy endpoint served
over TLS or mTLS; ``--token`` (or ``$GRPCMUX_TOKEN``) is the end-user token a proxy
with ``--proxy-auth-tokens`` wants in the ``grpcmux-token`` metadata.

Every problem ends in one line on stderr: exit status 2 for a usage error (including
an unusable certificate or key file), 1 for a failure at run time (unreachable
proxy, timeout, refused call).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, NamedTuple, Optional

from grpcmux import __version__
from grpcmux.addresses import AddressError, check_listen_address, parse_host_port
from grpcmux.ids import client_id_problem

DEFAULT_PROXY_ADDRESS = "localhost:7592"
DEFAULT_TIMEOUT = 10.0
# Where --token is read from when not given: a command line is visible to `ps`.
TOKEN_ENV = "GRPCMUX_TOKEN"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

TABLE_COLUMNS = ("CLIENT ID", "PROTOCOL", "HEALTH", "REMOTE ADDRESS", "CONNECTED SINCE",
                 "LABELS")
# Watch lines cannot be sized to their contents in advance: minimum widths instead.
_WATCH_WIDTHS = (12, 16, 8, 11, 21, 20, 0)


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class CommandFailed(Exception):
    """The command could not do its job; the message is the one line to show."""


class Server(NamedTuple):
    """A connected gRPC server as Discovery describes it."""

    client_id: str
    wire_protocol: str
    remote_address: str
    # RFC 3339 UTC with fractions ("...Z"), or None when the server did not say.
    connected_since: Optional[str]
    labels: Dict[str, str]
    # What its client reports of it: "serving", "not_serving" or "unknown".
    health: str = "unknown"

    def as_json(self) -> dict:
        return self._asdict()

    def cells(self) -> List[str]:
        """Table cells: one token each ("-" when empty), whole seconds."""
        since = self.connected_since
        if since is not None:
            since = since.partition(".")[0].rstrip("Z") + "Z"
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        values = (self.client_id, self.wire_protocol, self.health, self.remote_address,
                  since, labels)
        return [value or "-" for value in values]


# Discovery messages -> Server


def _server(details, fallback_id: str) -> Server:
    enum = type(details).Health
    health = enum.Name(details.health) if details.health in enum.values() else "HEALTH_UNKNOWN"
    since = None
    if details.HasField("connected_since"):
        since = details.connected_since.ToJsonString()
    return Server(
        client_id=details.client_id or fallback_id,
        wire_protocol=details.wire_protocol,
        remote_address=details.remote_address,
        connected_since=since,
        labels=dict(details.labels),
        health=health[len("HEALTH_"):].lower(),
    )


def servers_of(response) -> List[Server]:
    """The servers of a ListGRPCServerResponse.

    A Go grpc-multiplexer server sends ids only (no ``details``); they are shown
    with empty fields rather than refused.
    """
    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2

    if len(response.details) == len(response.servers):
        return [_server(d, i) for i, d in zip(response.servers, response.details)]
    empty = discovery_pb2.GRPCServer()
    return [_server(empty, i) for i in response.servers]


def _event_name(response) -> str:
    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2

    enum = discovery_pb2.WatchGRPCServerResponse.Event
    name = enum.Name(response.event) if response.event in enum.values() else "EVENT_UNKNOWN"
    return name[len("EVENT_"):].lower()


# Output


def write_table(out, servers: List[Server]) -> None:
    """A table with columns sized to their contents."""
    rows = [list(TABLE_COLUMNS)] + [s.cells() for s in servers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    for row in rows:
        out.write(_line(row, widths))


def _line(cells, widths) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells, widths)]
    return "  ".join(padded).rstrip() + "\n"


def _write_watch_event(out, event: str, server: Server, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"event": event, **server.as_json()}, sort_keys=True) + "\n")
    else:
        out.write(_line([event.upper()] + server.cells(), _WATCH_WIDTHS))
    out.flush()  # one event, one line, now: watch output is often piped


# grpc


def _channel(args):
    """A channel to ``--proxy-address``: plaintext, or TLS as the ``--tls*`` options say."""
    import grpc

    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return grpc.insecure_channel(args.proxy_address)
    from grpcmux.rpc.security import channel_credentials
    from grpcmux.tls import TLSConfigError

    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except TLSConfigError as error:
        raise UsageError(f"grpcmux {args.command}: {error}") from None
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.proxy_address, credentials, options=options)


def _metadata(args):
    from grpcmux.tokens import PROXY_TOKEN_METADATA_KEY

    return ((PROXY_TOKEN_METADATA_KEY, args.token),) if args.token else ()


def _rpc_problem(error, address: str, timeout: float) -> str:
    """One line saying why a Discovery call failed."""
    import grpc

    code = error.code()
    details = " ".join((error.details() or "").split())
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the grpcmux proxy at {address}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from the grpcmux proxy at {address} within {timeout:g} s"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{address} does not serve the grpcmux Discovery API (is it a proxy endpoint?)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the grpcmux proxy at {address} refused the call: {details} "
                f"(pass a valid --token or set {TOKEN_ENV})")
    return f"Discovery call to {address} failed: {code.name}: {details}"


def fetch_servers(channel, address: str, timeout: float, metadata=()) -> List[Server]:
    """Call ListGRPCServer (blocking, within ``timeout``); CommandFailed on error."""
    import grpc

    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc

    stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
    try:
        response = stub.ListGRPCServer(discovery_pb2.ListGRPCServerRequest(), timeout=timeout,
                                       metadata=metadata)
    except grpc.RpcError as error:
        raise CommandFailed(_rpc_problem(error, address, timeout)) from None
    return servers_of(response)


def list_servers(address: str, timeout: float) -> List[Server]:
    """The servers connected to the plaintext proxy at ``address`` (blocking)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        return fetch_servers(channel, address, timeout)


# Commands


def _run_list(args, out, err) -> int:
    with _channel(args) as channel:
        servers = fetch_servers(channel, args.proxy_address, args.timeout, _metadata(args))
    if args.json:
        out.write(json.dumps([s.as_json() for s in servers], indent=2, sort_keys=True) + "\n")
    else:
        write_table(out, servers)
        if not servers:
            err.write("no clients connected\n")
    return EXIT_OK


def _run_watch(args, out, err) -> int:
    """Stream Discovery events until Ctrl-C (exit 0) or the stream ends (exit 1).

    A List call first checks, within ``--timeout``, that the address is a reachable
    grpcmux proxy; the watch itself has no deadline.
    """
    import grpc

    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc

    address = args.proxy_address
    metadata = _metadata(args)
    with _channel(args) as channel:
        fetch_servers(channel, address, args.timeout, metadata)
        stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
        call = stub.WatchGRPCServer(discovery_pb2.WatchGRPCServerRequest(replay=args.replay,
                                                                         updates=True),
                                    metadata=metadata)
        if not args.json:
            out.write(_line(["EVENT", *TABLE_COLUMNS], _WATCH_WIDTHS))
            out.flush()
        try:
            for response in call:
                # A Go grpc-multiplexer server names the server only.
                details = (response.details if response.HasField("details")
                           else discovery_pb2.GRPCServer())
                server = _server(details, response.server)
                _write_watch_event(out, _event_name(response), server, args.json)
        except grpc.RpcError as error:
            raise CommandFailed(f"watch ended: {_rpc_problem(error, address, args.timeout)}")
    raise CommandFailed(f"watch ended: the proxy at {address} closed the stream "
                        "(is the multiplexer shutting down?)")


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
    """Reports usage errors as UsageError instead of printing and exiting."""

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


def _discovery_options(parser) -> None:
    parser.add_argument(
        "--proxy-address", type=_proxy_address, default=DEFAULT_PROXY_ADDRESS,
        metavar="HOST:PORT",
        help=f"the multiplexer server's proxy endpoint (default: {DEFAULT_PROXY_ADDRESS})")
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


def run(argv, out, err) -> int:
    """Run the command line ``argv`` (without the program name); the exit status."""
    try:
        args, extra = make_parser().parse_known_args(argv)
        if extra:  # named after the subcommand, which argparse itself does not do
            raise UsageError(f"grpcmux {args.command}: unrecognized arguments: "
                             f"{' '.join(extra)} (see 'grpcmux {args.command} --help')")
    except UsageError as error:
        err.write(f"{error}\n")
        return EXIT_USAGE
    except SystemExit as done:  # --help, --version
        return done.code or EXIT_OK
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
