"""Paged KV-cache bookkeeping (no torch): block pool, prefix hashing, per-request block tables."""
from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.kv_cache_manager import KVCacheManager, PrefixHit

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "PrefixHit"]
