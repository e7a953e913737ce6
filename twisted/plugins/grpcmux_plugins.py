"""twistd plugins ``grpcmux-server`` and ``grpcmux-client``.

Cheap to import: twistd scans this file for every command, so the tap modules
(and with them grpc and the reactor) are named as strings and loaded on use.
"""

from twisted.application.service import ServiceMaker

grpcmux_server = ServiceMaker(
    "grpcmux server",
    "grpcmux.tap.server",
    "gRPC multiplexer server: proxy endpoint for clients that dial in over yamux",
    "grpcmux-server",
)
grpcmux_client = ServiceMaker(
    "grpcmux client",
    "grpcmux.tap.client",
    "gRPC multiplexer client: dial out to a multiplexer server, serve a local gRPC server",
    "grpcmux-client",
)
