"""hpack's Decoder and Encoder, remembering the blocks that leave their tables alone.

A warm gRPC connection sends the same header blocks call after call: indexed
references to the same dynamic-table entries. Decoding (or encoding) such a block
does not change the table, so while the table stays as it was, the same bytes mean
(or the same header list makes) the same thing: a dictionary lookup instead of
~15-20 us of pure-Python HPACK per block (``benchmarks/h2_codec.py``). Any block
that inserts, evicts or resizes starts a new generation, and older entries no
longer count. Never-indexed fields are part of the key, so they stay never-indexed.
"""

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

_MAX_ENTRIES = 256


def _table_state(table):
    entries = table.dynamic_entries
    return len(entries), entries[0] if entries else None, table.maxsize


def _unchanged(before, after):
    return before[0] == after[0] and before[1] is after[1] and before[2] == after[2]


class CachingDecoder:
    """``decode(block)`` -> the header list, as ``Decoder.decode(block, raw=True)``."""

    def __init__(self, max_header_list_size, max_table_size):
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self._decoder.max_allowed_table_size = max_table_size
        self._table = self._decoder.header_table
        self._cache = {}
        self._generation = 0

    def decode(self, block):
        block = bytes(block)
        hit = self._cache.get(block)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        before = _table_state(self._table)
        headers = self._decoder.decode(block, raw=True)
        if _unchanged(before, _table_state(self._table)):
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[block] = (self._generation, headers)
        else:
            self._generation += 1
        return headers


class CachingEncoder:
    """``encode(headers)`` -> a header block, as ``Encoder.encode(headers)``."""

    def __init__(self):
        self._encoder = Encoder()
        self._table = self._encoder.header_table
        self._cache = {}
        self._generation = 0

    @property
    def header_table_size(self):
        return self._encoder.header_table_size

    @header_table_size.setter
    def header_table_size(self, value):
        self._encoder.header_table_size = value
        self._generation += 1

    def encode(self, headers):
        key = tuple((type(field) is NeverIndexedHeaderTuple, field[0], field[1])
                    for field in headers)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        before = _table_state(self._table)
        resized = bool(self._encoder.table_size_changes)  # emitted at this block's start
        block = self._encoder.encode(headers, huffman=True)
        if not resized and _unchanged(before, _table_state(self._table)):
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = (self._generation, block)
        else:
            self._generation += 1
        return block
