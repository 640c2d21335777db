"""A prompt's prefix-cache block hashes, as the engine computes them: what a cache-aware
router needs to match a prompt against the blocks Discovery/WatchKvEvents announces.

Standard library only (no engine, no torch): copy this file into a router as it is.

    block i's hash = BLAKE2b, 16-byte digest, over
        the hash of block i-1 (16 bytes), or the single byte 0x00 for block 0
        the block's token ids, each an 8-byte signed little-endian integer
        the request's cache_salt in UTF-8, when it has one

Only full blocks are hashed (a prompt of 37 tokens with block size 16 has 2 hashes). The
block size is ModelInfo.block_size (Discovery/GetModelInfo) and every BlockStored event's
block_size. The token ids are the prompt the engine runs: for a chat request, the rendered
and tokenized conversation (Tokenizer/RenderChat returns them).

A replica caches a prompt's first k blocks when it announced their k hashes (BlockStored) and
has not removed them since (BlockRemoved, AllBlocksCleared); the longest such k over the
replicas is where the prompt's prefill is cheapest.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_BYTES = 16
_FIRST_PARENT = b"\0"


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str = "") -> list[bytes]:
    """The hash of every full block of `token_ids`, in order."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[bytes] = []
    parent = _FIRST_PARENT
    salt = cache_salt.encode()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        h = hashlib.blake2b(digest_size=HASH_BYTES)
        h.update(parent)
        h.update(struct.pack(f"<{block_size}q", *block))
        if salt:
            h.update(salt)
        parent = h.digest()
        hashes.append(parent)
    return hashes
