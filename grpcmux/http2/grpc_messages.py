"""``--max-message-size`` without decoding: read the 5-byte prefix of each gRPC message.

A gRPC message on the wire is a 1-byte compressed flag, a 4-byte big-endian length,
then that many bytes. :class:`MessageLimit` follows the prefixes through the DATA
of one direction of one call and raises :class:`MessageTooLarge` at the first
prefix announcing more than the limit, before the message itself has arrived.
"""

PREFIX_LENGTH = 5


class MessageTooLarge(Exception):
    """A message longer than the limit; ``str()`` says both sizes."""


class MessageLimit:
    """Checks the message prefixes of one byte stream against ``limit``."""

    __slots__ = ("_limit", "_remaining", "_prefix")

    def __init__(self, limit):
        self._limit = limit
        self._remaining = 0  # bytes of the current message still to come
        self._prefix = b""  # a prefix split across DATA frames

    def feed(self, data):
        offset = 0
        size = len(data)
        while offset < size:
            if self._remaining:
                step = min(self._remaining, size - offset)
                self._remaining -= step
                offset += step
                continue
            need = PREFIX_LENGTH - len(self._prefix)
            self._prefix += bytes(data[offset:offset + need])
            offset += need
            if len(self._prefix) < PREFIX_LENGTH:
                return
            length = int.from_bytes(self._prefix[1:], "big")
            self._prefix = b""
            if length > self._limit:
                raise MessageTooLarge(
                    f"message of {length} bytes is larger than the limit of {self._limit} "
                    "(--max-message-size)")
            self._remaining = length
