"""The KV cache's bookkeeping: which of the pool's fixed-size blocks each sequence owns.

The tensors live with the model (model.PagedKVCache: per layer, K and V of shape
[n_blocks, n_kv_heads, block_size, head_dim]; a token's slot is
`block_id * block_size + offset`). `BlockPool` keeps a free list, reference counts,
and the prefix cache.

Prefix cache: a full block's key is a hash of (the previous block's key, its token
ids, any extra content such as an image's bytes hash), so a key names the whole
prefix up to that block. Sequences that start with the same tokens share those
blocks (ref count > 1). A block whose count drops to 0 keeps its key and waits in
least-recently-used order: a later request can still hit it, and it is evicted
(key dropped) only when a fresh block is needed and the free list is empty.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def block_key(parent: bytes | None, tokens, extra: bytes = b"") -> bytes:
    """The prefix-cache key of a full block: a digest of its parent's key, its token
    ids and extra content (image hashes). A cryptographic digest, so no prompt can be
    crafted to collide with another user's prefix."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    # One pack of the ids as little-endian uint32: half the time of a to_bytes per token, and
    # a block is keyed at every block_size-th token of every sequence.
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


class BlockPool:
    """Block ids 0..n_blocks-1: free, in use (ref count >= 1), or cached (count 0, key kept)."""

    def __init__(self, n_blocks: int, enable_prefix_caching: bool = True):
        self.n_blocks = n_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * n_blocks
        self.key_of: list[bytes | None] = [None] * n_blocks
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))   # pop() hands out 0, 1, 2, ...
        self.cached: OrderedDict[int, None] = OrderedDict()          # count 0, key kept; LRU first
        self.by_key: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus evictable cached ones."""
        return len(self.free) + len(self.cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.n_blocks

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            del self.by_key[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler checks num_free first)")
        self.ref[block] = 1
        return block

    def lookup(self, key: bytes) -> int | None:
        return self.by_key.get(key) if self.enable_prefix_caching else None

    def share(self, block: int) -> None:
        """Take one more reference to a block found by lookup."""
        if self.ref[block] == 0:
            del self.cached[block]
        self.ref[block] += 1

    def register(self, block: int, key: bytes) -> None:
        """A block just filled: make it findable by its key (first writer wins)."""
        if self.enable_prefix_caching and self.key_of[block] is None and key not in self.by_key:
            self.key_of[block] = key
            self.by_key[key] = block

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if self.key_of[block] is None:
                self.free.append(block)
            else:
                self.cached[block] = None          # most recently used last
