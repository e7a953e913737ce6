"""grpcmux: reach gRPC servers behind NAT through one proxy endpoint.

Multiplexer clients dial out to a multiplexer server over yamux; end users call any
connected gRPC server through the server's proxy endpoint with ``client-id`` metadata.
"""

__version__ = "0.1.0"
