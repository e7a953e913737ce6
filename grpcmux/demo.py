"""``grpcmux demo``: a whole grpcmux in one process, and one call through it.

On loopback, in this order: the example gRPC server (:mod:`grpcmux.example`,
with reflection so ``grpcmux call`` can find its types), a multiplexer server with its proxy
endpoint, and a multiplexer client (native wire protocol) in front of the example.
Then a user's call goes through the proxy with ``client-id`` metadata, and the
Discovery listing is shown.  The network parts run on the reactor; the blocking
grpc client calls run in threads; every wait has a timeout.
"""

import json
import shlex

import grpc
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogBeginner

from grpcmux._proto.grpcmux.v1 import demo_pb2, demo_pb2_grpc
from grpcmux.addresses import parse_host_port
from grpcmux.commands import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, CommandFailed, one_line
from grpcmux.example import SERVICE_NAME, STOP_GRACE, start_example_server
from grpcmux.listing import list_servers, write_table

LABELS = (("example", "demo"),)


def call_hello(proxy_address, client_id, name, timeout):
    """The user's call: Hello through the proxy, routed by ``client-id`` (blocking)."""
    with grpc.insecure_channel(proxy_address) as channel:
        stub = demo_pb2_grpc.DemoServiceStub(channel)
        try:
            return stub.Hello(
                demo_pb2.HelloRequest(name=name),
                metadata=(("client-id", client_id),),
                timeout=timeout,
            )
        except grpc.RpcError as error:
            details = one_line(error.details() or "")
            raise CommandFailed(
                f"the call through the proxy failed: {error.code().name}: {details}"
            ) from None


def dial_address(listen_address, port):
    """Where to reach a listener bound as ``listen_address`` on ``port``."""
    host, _ = parse_host_port(listen_address, listener=True)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _LastWarning:
    """A log observer keeping the latest warning, to explain a failure in one line."""

    def __init__(self):
        self.text = None

    def __call__(self, event):
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            self.text = one_line(formatEvent(event))


class Demo:
    """Starts the parts on the reactor, makes the call, stops everything again."""

    def __init__(self, reactor, args, out):
        self.reactor = reactor
        self.args = args
        self.out = out
        self.example = None
        self.example_port = None
        self.services = []  # started Twisted services, in start order
        self.succeeded = False

    def _within(self, d, what):
        """``d`` with the step timeout; a timeout fails with a line naming ``what``."""
        timeout = self.args.timeout

        def timed_out(failure):
            failure.trap(TimeoutError)
            raise CommandFailed(f"{what} did not happen within {timeout:g} s")

        return d.addTimeout(timeout, self.reactor).addErrback(timed_out)

    def _in_thread(self, what, fn, *args):
        # The thread's own grpc deadline ends it; the Deferred's timeout is a backstop.
        return self._within(deferToThread(fn, *args), what)

    def _start(self, service, what):
        try:
            service.startService()
        except Exception as error:
            raise CommandFailed(f"cannot start the {what}: {_one_line(error)}") from None
        self.services.append((service, what))
        return service

    async def run(self):
        from grpcmux.client import Tunnel, TunnelClientService
        from grpcmux.config import ClientSettings, ServerSettings
        from grpcmux.registry import ClientRegistry
        from grpcmux.proxy import ProxyService
        from grpcmux.server import MultiplexerServer

        args, reactor = self.args, self.reactor
        self.example, self.example_port = start_example_server(args.client_id)
        example_address = f"127.0.0.1:{self.example_port}"

        registry = ClientRegistry()
        settings = ServerSettings(multiplexer_listener=args.multiplexer_listener,
                                  proxy_listener=args.proxy_listener,
                                  shutdown_grace=STOP_GRACE)
        server = self._start(
            MultiplexerServer(reactor, registry, settings),
            "multiplexer server",
        )
        multiplexer_address = dial_address(args.multiplexer_listener, server.port.getHost().port)
        proxy = self._start(
            ProxyService(reactor, registry, settings, tunnels=server.tunnel_for),
            "proxy endpoint",
        )
        proxy_address = dial_address(args.proxy_listener, proxy.port)

        tunnel = Tunnel(reactor, ClientSettings(
            client_id=args.client_id, grpc_server_address=example_address,
            multiplexer_address=multiplexer_address, labels=LABELS))
        client = self._start(TunnelClientService(reactor, tunnel), "multiplexer client")
        admitted = client.when_connected()
        self._describe(multiplexer_address, proxy_address, example_address)
        await self._within(admitted, f"admission of client {args.client_id!r}")
        if args.client_id not in registry.snapshot:
            raise CommandFailed(f"client {args.client_id!r} was admitted but is not listed")

        self._say(f"Calling {SERVICE_NAME}/Hello through the proxy at {proxy_address} "
                  f"with metadata client-id: {args.client_id} ...")
        reply = await self._in_thread(
            "the call through the proxy", call_hello,
            proxy_address, args.client_id, args.name, args.timeout)
        self._say(f"Reply from server {reply.server!r}: {reply.message}")
        self._say("")
        self._say("Discovery listing (grpcmux list):")
        servers = await self._in_thread(
            "the Discovery listing", list_servers, proxy_address, args.timeout)
        write_table(self.out, servers)
        self.succeeded = True
        if args.keep_running:
            self._say("")
            self._say("Running until Ctrl-C; try the commands above.")
            await Deferred()  # fires never: Ctrl-C stops the reactor

    def _describe(self, multiplexer_address, proxy_address, example_address):
        args = self.args
        labels = [f"{k}={v}" for k, v in LABELS]
        lines = [
            "grpcmux demo: started in this process, on loopback:",
            f"  multiplexer server   {multiplexer_address}  (multiplexer clients dial in here)",
            f"  proxy endpoint       {proxy_address}  (users call here; Discovery API too)",
            f"  example gRPC server  {example_address}  ({SERVICE_NAME}, health, reflection)",
            f"  multiplexer client   id {args.client_id!r}, native wire protocol, "
            f"labels {','.join(labels)}, in front of the example server",
            "",
            "The same as separate commands:",
            "  " + shlex.join(["grpcmux", "example-server", "--listen", example_address]),
            "  " + shlex.join([
                "twistd", "-n", "--pidfile=", "grpcmux-server",
                "--multiplexer-listener", multiplexer_address,
                "--proxy-listener", proxy_address,
            ]),
            "  " + shlex.join([
                "twistd", "-n", "--pidfile=", "grpcmux-client",
                "--client-id", args.client_id,
                "--multiplexer-address", multiplexer_address,
                "--grpc-server-address", example_address,
                *(part for label in labels for part in ("--label", label)),
            ]),
            "  " + shlex.join([
                "grpcmux", "call", "--proxy-address", proxy_address,
                "--client-id", args.client_id, f"{SERVICE_NAME}/Hello",
                "-d", json.dumps({"name": args.name}),
            ]),
            "  " + shlex.join(["grpcmux", "list", "--proxy-address", proxy_address]),
            "",
        ]
        for line in lines:
            self._say(line)

    def _say(self, line):
        self.out.write(line + "\n")
        self.out.flush()

    async def stop(self):
        """Stop what was started, newest first; the example server last."""
        problems = []
        for service, what in reversed(self.services):
            try:
                await self._within(maybeDeferred(service.stopService), f"stopping the {what}")
            except Exception as error:
                problems.append(_one_line(error))
        self.services = []
        if self.example is not None:
            example, self.example = self.example, None
            stopping = deferToThread(lambda: example.stop(STOP_GRACE).wait(self.args.timeout))
            try:
                await self._within(stopping, "stopping the example gRPC server")
            except Exception as error:
                problems.append(_one_line(error))
        if problems:
            raise CommandFailed("; ".join(problems))


def _one_line(error):
    """An exception as one line; its type is named where the text alone is unclear."""
    speaks_for_itself = isinstance(error, (CommandFailed, OSError)) or (
        type(error).__module__ == "twisted.internet.error"
    )
    text = str(error) if speaks_for_itself and str(error) else f"{type(error).__name__}: {error}"
    return one_line(text)


def run(args, out, err):
    """Run the demo on the global reactor (once per process); the exit status."""
    from twisted.internet import reactor

    from grpcmux.logging import make_observer

    last_warning = _LastWarning()
    observers = [last_warning]
    if args.verbose:
        observers.append(make_observer(err, "info"))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    demo = Demo(reactor, args, out)
    outcome = []

    def finished(result):
        outcome.append(result)
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already: Ctrl-C came first

    def stopped():
        return ensureDeferred(demo.stop()).addErrback(outcome.append)

    def start():
        reactor.addSystemEventTrigger("before", "shutdown", stopped)
        ensureDeferred(demo.run()).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()

    failures = [f for f in outcome if f is not None]
    if failures:
        message = _one_line(failures[0].value)
        if last_warning.text and "did not happen within" in message:
            message += f" (last warning: {last_warning.text})"
        err.write(f"grpcmux demo: {message}\n")
        return EXIT_FAILURE
    if demo.succeeded:
        return EXIT_OK
    return EXIT_INTERRUPTED
