"""The byte pattern the flood backend sends and the callers check.

Chunk ``i`` is ``i`` as 8 big-endian bytes, repeated: any lost, duplicated or
reordered chunk changes the running hash.
"""

import hashlib

CHUNK = 64 * 1024
SERVICE = "test.Echo"


def chunk(index, size=CHUNK):
    return index.to_bytes(8, "big") * (size // 8)


def expected_digest(count, size=CHUNK):
    """SHA-256 of the first ``count`` chunks."""
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(chunk(index, size))
    return digest.hexdigest()


def echo_payload(call, index, size=1024):
    """Distinct bytes for message ``index`` of call ``call`` (echo calls)."""
    return (f"{call}:{index}:".encode() * size)[:size]
