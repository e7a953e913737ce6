"""What the router's codec choices cost: frame parsing, and HPACK per call.

Prints microseconds per operation for:
- reading a typical unary call's frames (HEADERS, DATA, WINDOW_UPDATE) with the
  router's own 9-byte header parse, and with ``hyperframe`` (parse_frame_header +
  parse_body), which the router does not use;
- decoding and re-encoding a grpc-go-style request header block with ``hpack``,
  first call (literals into the dynamic table) and warm (indexed references), and
  warm through the router's caches (``grpcmux.http2.hpack_cache``).

    python benchmarks/h2_codec.py [--rounds N]
"""

import argparse
import os
import sys
import time

from hpack import Decoder, Encoder
from hyperframe.frame import Frame

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpcmux.http2.frames import (  # noqa: E402
    FLAG_END_HEADERS,
    TYPE_DATA,
    TYPE_HEADERS,
    TYPE_WINDOW_UPDATE,
    frame_header,
    parse_frame_header,
)
from grpcmux.http2.hpack_cache import CachingDecoder, CachingEncoder  # noqa: E402

REQUEST = [
    (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/grpcmux.v1.Bench/Unary"),
    (b":authority", b"127.0.0.1:7592"), (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-go/1.55.0"), (b"te", b"trailers"), (b"client-id", b"bench"),
    (b"grpc-timeout", b"9999995u"),
]


def _frames():
    block = Encoder().encode(REQUEST)
    message = b"\x00\x00\x00\x00\x64" + b"x" * 100
    return (frame_header(len(block), TYPE_HEADERS, FLAG_END_HEADERS, 1) + block
            + frame_header(len(message), TYPE_DATA, 1, 1) + message
            + frame_header(4, TYPE_WINDOW_UPDATE, 0, 0) + b"\x00\x00\x01\x00")


def own_parse(data):
    offset, size, count = 0, len(data), 0
    while size - offset >= 9:
        length, _, _, _ = parse_frame_header(data, offset)
        _payload = data[offset + 9:offset + 9 + length]
        offset += 9 + length
        count += 1
    return count


def hyperframe_parse(data):
    view, offset, count = memoryview(data), 0, 0
    while len(view) - offset >= 9:
        frame, length = Frame.parse_frame_header(view[offset:offset + 9])
        frame.parse_body(view[offset + 9:offset + 9 + length])
        offset += 9 + length
        count += 1
    return count


def timed(fn, rounds):
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - started) / rounds * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args(argv)
    data = _frames()
    print(f"frames of one unary call: own parse {timed(lambda: own_parse(data), args.rounds):.2f} us,"
          f" hyperframe {timed(lambda: hyperframe_parse(data), args.rounds):.2f} us")

    encoder, decoder = Encoder(), Decoder()
    first = encoder.encode(REQUEST, huffman=False)
    warm = encoder.encode(REQUEST, huffman=False)
    decoder.decode(first, raw=True)
    cold_decode = timed(lambda: Decoder().decode(first, raw=True), args.rounds)
    warm_decode = timed(lambda: decoder.decode(warm, raw=True), args.rounds)
    out = Encoder()
    out.encode(REQUEST, huffman=False)
    warm_encode = timed(lambda: out.encode(REQUEST, huffman=False), args.rounds)
    huffman_encode = timed(lambda: out.encode(REQUEST, huffman=True), args.rounds)
    print(f"hpack request block ({len(first)} B first, {len(warm)} B warm): decode first "
          f"{cold_decode:.1f} us, warm {warm_decode:.1f} us; encode warm {warm_encode:.1f} us"
          f" (huffman {huffman_encode:.1f} us)")
    cached_in, cached_out = CachingDecoder(65536, 4096), CachingEncoder()
    cached_in.decode(first)
    cached_out.encode(REQUEST)
    cached_out.encode(REQUEST)
    print(f"with grpcmux.http2.hpack_cache, warm: decode "
          f"{timed(lambda: cached_in.decode(warm), args.rounds):.2f} us, encode "
          f"{timed(lambda: cached_out.encode(REQUEST), args.rounds):.2f} us")


if __name__ == "__main__":
    main()
