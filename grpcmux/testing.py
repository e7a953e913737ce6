"""Public test helpers: build and read yamux frames, connect two sessions in memory."""

from typing import NamedTuple

from grpcmux.yamux import frame as _f


class Frame(NamedTuple):
    """One frame as read back from the wire: header fields plus the DATA body."""

    type: int
    flags: int
    stream_id: int
    length: int
    data: bytes = b""
    version: int = _f.VERSION


def build_frame(type, flags=0, stream_id=0, length=None, data=b"", version=_f.VERSION):
    """Return the bytes of one frame; ``length`` defaults to ``len(data)``."""
    if length is None:
        length = len(data)
    header = bytearray(_f.encode_header(type, flags, stream_id, length))
    header[0] = version
    return bytes(header) + data


def data_frame(stream_id, data, flags=0):
    """Bytes of a DATA frame."""
    return build_frame(_f.TYPE_DATA, flags, stream_id, data=data)


def window_update(stream_id, delta=0, flags=0):
    """Bytes of a WINDOW_UPDATE frame (SYN/ACK/FIN/RST go in ``flags``)."""
    return build_frame(_f.TYPE_WINDOW_UPDATE, flags, stream_id, delta)


def ping_frame(value, flags=_f.FLAG_SYN):
    """Bytes of a PING request (or reply with ``flags=FLAG_ACK``)."""
    return build_frame(_f.TYPE_PING, flags, 0, value)


def go_away_frame(code=_f.GO_AWAY_NORMAL):
    """Bytes of a GO_AWAY frame."""
    return build_frame(_f.TYPE_GO_AWAY, 0, 0, code)


def parse_frames(data):
    """Parse complete frames from ``data``; raises ValueError on trailing bytes."""
    frames = []
    view = memoryview(data)
    pos = 0
    while len(data) - pos >= _f.HEADER_SIZE:
        header = _f.decode_header(view, pos)
        pos += _f.HEADER_SIZE
        body = b""
        if header.type == _f.TYPE_DATA:
            body = bytes(view[pos:pos + header.length])
            if len(body) < header.length:
                raise ValueError("truncated DATA frame")
            pos += header.length
        frames.append(Frame(header.type, header.flags, header.stream_id,
                            header.length, body, header.version))
    if pos != len(data):
        raise ValueError("trailing partial frame")
    return frames


def read_frames(transport, clear=True):
    """Every frame a StringTransport received (cleared afterwards by default)."""
    data = transport.value()
    if clear:
        transport.clear()
    return parse_frames(data)
