"""Socket tuning for the connections that carry a tunnel's bytes.

This is the application's business, not the protocol's: the yamux package
takes a ``tune_transport`` callable and the server, the client and the yamux
command-line tool pass this one.
"""

from twisted.internet.abstract import FileDescriptor

# Bytes per recv(), per send(), and buffered before the producer is paused, on the
# transports that carry a tunnel's bytes. Twisted's 64 KiB (128 KiB per send) costs a
# reactor turn per 64 KiB at hundreds of MB/s; one default window (256 KiB) moved a
# 16 MiB server stream through grpcmux about 1.3x faster (benchmarks/grpc_bench.py).
IO_SIZE = 256 * 1024


def tune_transport(transport):
    """Turn Nagle off on a TCP (or TLS over TCP) transport and size its I/O in bulk.

    Frames are written whole, so nothing gains from coalescing; with Nagle on, a
    small write behind unacknowledged data (a call's HEADERS after the previous
    reply) waits for the peer's delayed ACK: 40 ms per unary call, measured.
    Transports without these knobs (a yamux stream, a test's fake) are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
    if isinstance(transport, FileDescriptor):
        transport.bufferSize = IO_SIZE
        transport.SEND_LIMIT = IO_SIZE
