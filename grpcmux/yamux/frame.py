"""yamux frame constants, header codec and an incremental frame parser.

The wire format is hashicorp/yamux ``spec.md``: a 12-byte big-endian header
(version, type, flags, stream id, length).  Only DATA frames carry a body; for
WINDOW_UPDATE, PING and GO_AWAY the length field is a value (a window delta, a
ping opaque value, an error code) and is never followed by payload bytes.
"""

import struct
from typing import NamedTuple

from .errors import ProtocolError

VERSION = 0
HEADER_SIZE = 12
INITIAL_STREAM_WINDOW = 256 * 1024
MAX_STREAM_ID = 0xFFFFFFFF
MAX_STREAM_WINDOW = 0xFFFFFFFF  # a window is a 32-bit length

TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR, GO_AWAY_INTERNAL_ERROR = 0, 1, 2

_HEADER = struct.Struct(">BBHII")
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from


class FrameHeader(NamedTuple):
    """A decoded frame header."""

    version: int
    type: int
    flags: int
    stream_id: int
    length: int


def encode_header(type, flags, stream_id, length):
    """Return the 12 header bytes of a frame (version 0)."""
    return _pack(VERSION, type, flags, stream_id, length)


def decode_header(buf, offset=0):
    """Decode the 12 header bytes found in ``buf`` at ``offset``."""
    return FrameHeader(*_unpack_from(buf, offset))


class FrameParser:
    """Split a byte stream into yamux frames, whatever the chunking.

    ``handler`` receives:

    - ``frame_received(header) -> bool`` for every frame once its header is
      complete.  For a DATA frame with a non-empty body the return value says
      whether the body is wanted (true) or should be skipped (false).  The
      handler may raise :class:`ProtocolError` (for example when the body is
      larger than the stream's receive window) before any body byte is read.
    - ``data_received(header, chunk, last)`` for each piece of a wanted DATA
      body as it arrives; ``last`` is true on the piece that ends the frame.
      ``chunk`` is the fed bytes when the piece is all of it, else a memoryview
      into them (no copy; the handler copies what it must keep as bytes).

    The body is never collected here: each received chunk is handed on as soon
    as it is read, so an announced length never makes the parser buffer
    anything; at most 11 bytes of a split header are kept between calls.
    A version other than 0 or an unknown type raises :class:`ProtocolError`.
    """

    __slots__ = ("_handler", "_partial", "_header", "_remaining", "_wanted", "_stopped")

    def __init__(self, handler):
        self._handler = handler
        self._partial = b""
        self._header = None
        self._remaining = 0
        self._wanted = False
        self._stopped = False

    @property
    def buffered(self):
        """Bytes of a split header kept until the rest of it is fed (at most 11)."""
        return len(self._partial)

    @property
    def at_frame_boundary(self):
        """True when the next byte fed starts a frame."""
        return not self._partial and not self._remaining

    def stop(self):
        """Ignore everything fed from now on (the session is gone)."""
        self._stopped = True

    def feed(self, data):
        """Parse ``data`` (bytes), calling the handler for what completes."""
        if self._stopped:
            return
        pos = 0
        size = len(data)
        if self._partial:
            # Complete a split header from the first bytes only: no copy of data.
            need = HEADER_SIZE - len(self._partial)
            if size < need:
                self._partial += data
                return
            self._header_received(self._partial + data[:need], 0)
            self._partial = b""
            pos = need
        handler = self._handler
        while not self._stopped:
            remaining = self._remaining
            if remaining:
                take = size - pos
                if take <= 0:
                    return
                if take > remaining:
                    take = remaining
                remaining -= take
                self._remaining = remaining
                if self._wanted:
                    if pos == 0 and take == size:
                        chunk = data
                    else:
                        chunk = memoryview(data)[pos:pos + take]
                    pos += take
                    handler.data_received(self._header, chunk, remaining == 0)
                else:
                    pos += take
                continue
            if size - pos < HEADER_SIZE:
                if pos < size:
                    self._partial = data[pos:]
                return
            self._header_received(data, pos)
            pos += HEADER_SIZE

    def _header_received(self, buf, offset):
        version, ftype, flags, stream_id, length = _unpack_from(buf, offset)
        if version != VERSION:
            self._stopped = True
            raise ProtocolError(f"invalid protocol version {version}")
        if ftype > TYPE_GO_AWAY:
            self._stopped = True
            raise ProtocolError(f"invalid frame type {ftype}")
        header = FrameHeader(version, ftype, flags, stream_id, length)
        try:
            wanted = self._handler.frame_received(header)
        except ProtocolError:
            self._stopped = True
            raise
        if ftype == TYPE_DATA and length:
            self._header = header
            self._remaining = length
            self._wanted = bool(wanted)
