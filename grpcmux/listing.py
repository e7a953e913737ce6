"""Discovery through the proxy endpoint: ``grpcmux list`` and ``grpcmux watch``.

Plain blocking grpc clients, no reactor.  :func:`channel_for` (``--tls*``) and
:func:`token_metadata` (``--token``) are how every command reaching the proxy
connects, ``grpcmux call`` included.  grpc is imported inside the functions, so
importing this module stays cheap for ``--help`` and usage errors.
"""

import json
from typing import Dict, List, NamedTuple, Optional

from grpcmux.commands import EXIT_OK, CommandFailed, UsageError

# Where --token is read from when not given: a command line is visible to `ps`.
TOKEN_ENV = "GRPCMUX_TOKEN"

TABLE_COLUMNS = ("CLIENT ID", "PROTOCOL", "HEALTH", "REMOTE ADDRESS", "CONNECTED SINCE",
                 "LABELS")
# Watch lines cannot be sized to their contents in advance: minimum widths instead.
_WATCH_WIDTHS = (12, 16, 8, 11, 21, 20, 0)


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


def channel_for(args):
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


def token_metadata(args):
    from grpcmux.tokens import PROXY_TOKEN_METADATA_KEY

    return ((PROXY_TOKEN_METADATA_KEY, args.token),) if args.token else ()


def rpc_problem(error, address: str, timeout: float) -> str:
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
        raise CommandFailed(rpc_problem(error, address, timeout)) from None
    return servers_of(response)


def list_servers(address: str, timeout: float) -> List[Server]:
    """The servers connected to the plaintext proxy at ``address`` (blocking)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        return fetch_servers(channel, address, timeout)



def run_list(args, out, err) -> int:
    with channel_for(args) as channel:
        servers = fetch_servers(channel, args.proxy_address, args.timeout, token_metadata(args))
    if args.json:
        out.write(json.dumps([s.as_json() for s in servers], indent=2, sort_keys=True) + "\n")
    else:
        write_table(out, servers)
        if not servers:
            err.write("no clients connected\n")
    return EXIT_OK


def run_watch(args, out, err) -> int:
    """Stream Discovery events until Ctrl-C (exit 0) or the stream ends (exit 1).

    A List call first checks, within ``--timeout``, that the address is a reachable
    grpcmux proxy; the watch itself has no deadline.
    """
    import grpc

    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc

    address = args.proxy_address
    metadata = token_metadata(args)
    with channel_for(args) as channel:
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
            raise CommandFailed(f"watch ended: {rpc_problem(error, address, args.timeout)}")
    raise CommandFailed(f"watch ended: the proxy at {address} closed the stream "
                        "(is the multiplexer shutting down?)")

