"""Chained hashes over full KV blocks, the keys of the prefix cache.

    block i's hash = H(hash of block i-1, token ids of block i, cache salt, LoRA id)

Chaining makes a hash identify the whole prefix up to and including its block, so two
requests share a cached block only when every token before it matches too. The salt (one per
tenant, optional) keeps tenants from sharing blocks; the LoRA adapter id (0: the base
model) keeps KV computed under one adapter from serving another, since every layer's K and V
depend on the adapter. blake2b rather than Python's hash():
stable across processes, so hashes can later be exported to routers.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], salt: str = "", lora_id: int = 0
) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0")
    h.update(array("q", token_ids).tobytes())
    if salt:
        h.update(salt.encode())
    if lora_id:
        # Distinct from any salt: a salt is text, this a tagged integer.
        h.update(b"\0lora" + lora_id.to_bytes(8, "little"))
    return h.digest()


def extend_block_hashes(
    block_hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, salt: str = "",
    lora_id: int = 0,
) -> None:
    """Append the hashes of every full block of `token_ids` not hashed yet (in place)."""
    num_full_blocks = len(token_ids) // block_size
    for i in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[i - 1] if i else None
        start = i * block_size
        block = token_ids[start : start + block_size]
        block_hashes.append(hash_block(parent, block, salt, lora_id))
