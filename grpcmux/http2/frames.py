"""HTTP/2 frame constants and the 9-byte frame header (RFC 9113 section 4.1).

Names mirror the RFC: ``TYPE_DATA``, ``FLAG_END_STREAM``, ``SETTINGS_INITIAL_WINDOW_SIZE``,
``ERROR_PROTOCOL_ERROR``.
"""

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LENGTH = 9

TYPE_DATA = 0x0
TYPE_HEADERS = 0x1
TYPE_PRIORITY = 0x2
TYPE_RST_STREAM = 0x3
TYPE_SETTINGS = 0x4
TYPE_PUSH_PROMISE = 0x5
TYPE_PING = 0x6
TYPE_GOAWAY = 0x7
TYPE_WINDOW_UPDATE = 0x8
TYPE_CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# Not an IANA setting: grpcmux's proxy endpoint announces itself with it (value 1),
# so a multiplexer client can tell that its "gRPC server" is a grpcmux proxy and
# refuse to loop. Peers ignore settings they do not know (RFC 9113 section 6.5.2).
SETTINGS_GRPCMUX_PROXY = 0x6D78

ERROR_NO_ERROR = 0x0
ERROR_PROTOCOL_ERROR = 0x1
ERROR_INTERNAL_ERROR = 0x2
ERROR_FLOW_CONTROL_ERROR = 0x3
ERROR_SETTINGS_TIMEOUT = 0x4
ERROR_STREAM_CLOSED = 0x5
ERROR_FRAME_SIZE_ERROR = 0x6
ERROR_REFUSED_STREAM = 0x7
ERROR_CANCEL = 0x8
ERROR_COMPRESSION_ERROR = 0x9
ERROR_CONNECT_ERROR = 0xA
ERROR_ENHANCE_YOUR_CALM = 0xB
ERROR_INADEQUATE_SECURITY = 0xC
ERROR_HTTP_1_1_REQUIRED = 0xD

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

_HEADER = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, stream id


def frame_header(length, frame_type, flags, stream_id):
    """The 9-byte header of a frame (the reserved bit clear)."""
    return _HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id & 0x7FFFFFFF)


def parse_frame_header(data, offset=0):
    """(length, type, flags, stream id) of the header at ``offset``; reserved bit dropped."""
    high, low, frame_type, flags, stream_id = _HEADER.unpack_from(data, offset)
    return (high << 8) | low, frame_type, flags, stream_id & 0x7FFFFFFF
