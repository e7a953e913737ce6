"""Raw HTTP/2 for the router's unit tests: build frames, read what a connection wrote.

Builders return bytes to feed to ``dataReceived``; header blocks are encoded with
the sender's own hpack ``Encoder`` (one per connection, as a real peer keeps).
:class:`FrameReader` parses everything written to a ``StringTransport`` into
:class:`Frame` objects, joins HEADERS + CONTINUATION into one block and decodes it
with its connection's hpack ``Decoder``.
"""

import struct

from hpack import Decoder

from grpcmux.http2.frames import (
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FRAME_HEADER_LENGTH,
    PREFACE,
    TYPE_CONTINUATION,
    TYPE_DATA,
    TYPE_GOAWAY,
    TYPE_HEADERS,
    TYPE_PING,
    TYPE_RST_STREAM,
    TYPE_SETTINGS,
    TYPE_WINDOW_UPDATE,
    frame_header,
    parse_frame_header,
)

TYPE_NAMES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS",
              5: "PUSH_PROMISE", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE",
              9: "CONTINUATION"}


def frame(frame_type, flags=0, stream_id=0, payload=b""):
    """Any frame, as given (no checks: tests send malformed ones on purpose)."""
    return frame_header(len(payload), frame_type, flags, stream_id) + payload


def settings(*pairs, ack=False):
    payload = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
    return frame(TYPE_SETTINGS, FLAG_ACK if ack else 0, 0, payload)


def settings_ack():
    return settings(ack=True)


def ping(opaque=b"pingpong", ack=False):
    return frame(TYPE_PING, FLAG_ACK if ack else 0, 0, opaque)


def window_update(stream_id, increment):
    return frame(TYPE_WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment))


def rst_stream(stream_id, code):
    return frame(TYPE_RST_STREAM, 0, stream_id, struct.pack(">L", code))


def goaway(last_stream_id, code=0, debug=b""):
    return frame(TYPE_GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code) + debug)


def data(stream_id, payload, end_stream=False, pad=None):
    flags = FLAG_END_STREAM if end_stream else 0
    if pad is not None:
        flags |= FLAG_PADDED
        payload = bytes([pad]) + payload + b"\0" * pad
    return frame(TYPE_DATA, flags, stream_id, payload)


def headers(encoder, stream_id, fields, end_stream=False, split=None):
    """HEADERS (+ CONTINUATION frames of ``split`` bytes each, if given) for ``fields``."""
    block = encoder.encode(fields, huffman=False)
    flags = FLAG_END_STREAM if end_stream else 0
    if split is None or len(block) <= split:
        return frame(TYPE_HEADERS, flags | FLAG_END_HEADERS, stream_id, block)
    pieces = [block[i:i + split] for i in range(0, len(block), split)]
    out = [frame(TYPE_HEADERS, flags, stream_id, pieces[0])]
    for index, piece in enumerate(pieces[1:], 2):
        last = FLAG_END_HEADERS if index == len(pieces) else 0
        out.append(frame(TYPE_CONTINUATION, last, stream_id, piece))
    return b"".join(out)


def grpc_message(payload, compressed=False):
    """One gRPC length-prefixed message (what DATA frames carry)."""
    return bytes([1 if compressed else 0]) + struct.pack(">L", len(payload)) + payload


class Frame:
    """One frame as read; a header block's HEADERS + CONTINUATION come as one."""

    def __init__(self, frame_type, flags, stream_id, payload, headers=None, continuations=0):
        self.type = frame_type
        self.flags = flags
        self.stream_id = stream_id
        self.payload = payload
        self.headers = headers  # decoded (name, value) bytes pairs, HEADERS only
        self.continuations = continuations

    def __repr__(self):
        name = TYPE_NAMES.get(self.type, hex(self.type))
        detail = self.headers if self.headers is not None else self.payload[:40]
        return f"<{name} flags={self.flags:#x} stream={self.stream_id} {detail!r}>"

    @property
    def end_stream(self):
        return self.type in (TYPE_DATA, TYPE_HEADERS) and bool(self.flags & FLAG_END_STREAM)

    @property
    def ack(self):
        return bool(self.flags & FLAG_ACK)

    @property
    def error_code(self):
        """The code of a RST_STREAM or GOAWAY."""
        if self.type == TYPE_RST_STREAM:
            return struct.unpack(">L", self.payload)[0]
        if self.type == TYPE_GOAWAY:
            return struct.unpack_from(">L", self.payload, 4)[0]
        raise AttributeError("error_code")

    @property
    def last_stream_id(self):
        return struct.unpack_from(">L", self.payload)[0] & 0x7FFFFFFF

    @property
    def increment(self):
        return struct.unpack(">L", self.payload)[0] & 0x7FFFFFFF

    @property
    def settings(self):
        return dict(struct.unpack_from(">HL", self.payload, i)
                    for i in range(0, len(self.payload), 6))

    def header(self, name):
        """The values of header ``name`` (bytes) in this block, in order."""
        return [v for n, v in self.headers if n == name]


class FrameReader:
    """Frames written to ``transport`` (a StringTransport), read incrementally.

    ``preface``: the writer is a client and starts with the connection preface,
    which is checked and skipped.
    """

    def __init__(self, transport, preface=False, max_header_list_size=2**32):
        self.transport = transport
        self.decoder = Decoder(max_header_list_size=max_header_list_size)
        self._buffer = b""
        self._preface = preface
        self._block = None  # (frame, fragments, count) of an open header block

    def read(self):
        """The complete frames written since the last call."""
        self._buffer += self.transport.value()
        self.transport.clear()
        if self._preface:
            if len(self._buffer) < len(PREFACE):
                return []
            assert self._buffer.startswith(PREFACE), self._buffer[:24]
            self._buffer = self._buffer[len(PREFACE):]
            self._preface = False
        frames = []
        while len(self._buffer) >= FRAME_HEADER_LENGTH:
            length, frame_type, flags, stream_id = parse_frame_header(self._buffer)
            end = FRAME_HEADER_LENGTH + length
            if len(self._buffer) < end:
                break
            payload, self._buffer = self._buffer[FRAME_HEADER_LENGTH:end], self._buffer[end:]
            read = self._frame(frame_type, flags, stream_id, payload)
            if read is not None:
                frames.append(read)
        return frames

    def _frame(self, frame_type, flags, stream_id, payload):
        if frame_type == TYPE_HEADERS:
            assert self._block is None, "HEADERS inside a header block"
            read = Frame(frame_type, flags, stream_id, payload)
            self._block = (read, [payload], 0)
        elif frame_type == TYPE_CONTINUATION:
            assert self._block is not None and self._block[0].stream_id == stream_id
            read, fragments, count = self._block
            fragments.append(payload)
            self._block = (read, fragments, count + 1)
        else:
            assert self._block is None, "a frame inside a header block"
            return Frame(frame_type, flags, stream_id, payload)
        if not flags & FLAG_END_HEADERS:
            return None
        read, fragments, count = self._block
        self._block = None
        read.headers = self.decoder.decode(b"".join(fragments), raw=True)
        read.continuations = count
        read.flags |= FLAG_END_HEADERS
        return read
