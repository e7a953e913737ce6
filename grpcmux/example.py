"""The example gRPC server: ``grpcmux.v1.DemoService`` with health and reflection.

``grpcmux demo`` runs it in-process behind its client; ``grpcmux example-server
--listen HOST:PORT`` runs it alone, so a fresh machine has a gRPC server to put
behind ``twistd grpcmux-client`` and to call with ``grpcmux call``.  It serves one
method of each call kind, standard health checking (``grpc.health.v1``, SERVING)
and server reflection, so clients need no .proto files.
"""

import signal
import threading
from concurrent import futures

import grpc

from grpcmux._proto.grpcmux.v1 import demo_pb2, demo_pb2_grpc
from grpcmux.commands import EXIT_OK, CommandFailed

SERVICE_NAME = demo_pb2.DESCRIPTOR.services_by_name["DemoService"].full_name
# HelloMany's bound on ``count``: an example must not stream without end.
MAX_GREETINGS = 100
# How long running calls get when the server stops.
STOP_GRACE = 1.0


class DemoServicer(demo_pb2_grpc.DemoServiceServicer):
    """The example service: greets, and says which server answered."""

    def __init__(self, server_name):
        self.server_name = server_name

    def _reply(self, name):
        return demo_pb2.HelloReply(message=f"Hello, {name or 'world'}!", server=self.server_name)

    def Hello(self, request, context):
        return self._reply(request.name)

    def HelloMany(self, request, context):
        if request.count > MAX_GREETINGS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"count must be at most {MAX_GREETINGS}, got {request.count}")
        for _ in range(request.count):
            yield self._reply(request.name)

    def HelloAll(self, request_iterator, context):
        names = [request.name or "world" for request in request_iterator]
        return self._reply(", ".join(names) if names else "nobody")

    def HelloEach(self, request_iterator, context):
        for request in request_iterator:
            yield self._reply(request.name)


def start_example_server(server_name, address="127.0.0.1:0"):
    """A started grpc server serving DemoService, health and reflection; ``(server, port)``."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(4, "grpcmux-example"))
    demo_pb2_grpc.add_DemoServiceServicer_to_server(DemoServicer(server_name), server)
    checks = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's only word on a failed bind
        raise CommandFailed(f"the example gRPC server cannot listen on {address}") from None
    server.start()
    return server, port


def run(args, out, err):
    """``grpcmux example-server``: serve until SIGTERM or Ctrl-C; exit 0."""
    server, port = start_example_server(args.name, args.listen)
    host = args.listen.rpartition(":")[0] or "0.0.0.0"
    out.write(f"example gRPC server ({SERVICE_NAME}, health, reflection) "
              f"listening on {host}:{port}; Ctrl-C to stop\n")
    out.flush()
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop(STOP_GRACE).wait()
    return EXIT_OK
