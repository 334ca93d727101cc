"""The teacher cache on disk: format, encodings, backends, manifest, writer, reader, verification. No torch here."""
from .manifest import FORMAT_VERSION, cache_key
from .reader import Cache, block_shuffle, open_cache
from .verify import VerifyError, convert, describe, statistics, verify
from .writer import CacheMismatch, CacheWriter, complete_manifest, make_plan, part_rows

__all__ = ["FORMAT_VERSION", "Cache", "CacheMismatch", "CacheWriter", "VerifyError", "block_shuffle", "cache_key",
           "complete_manifest", "convert", "describe", "make_plan", "open_cache", "part_rows", "statistics", "verify"]
