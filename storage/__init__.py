"""The teacher cache on disk: format, encodings, backends, manifest, writer, reader, verification. No torch here."""

from .errors import CacheBusy, CacheError, CacheMismatch, CorruptCache, IncompleteCache, VerifyError
from .manifest import FORMAT_VERSION, cache_key
from .part import check_encoding_options
from .reader import Cache, block_shuffle, open_cache
from .verify import convert, describe, statistics, verify
from .writer import BackgroundWriter, CacheWriter, cache_key_at, complete_manifest, make_plan, part_rows

__all__ = [
    "FORMAT_VERSION",
    "BackgroundWriter",
    "Cache",
    "CacheBusy",
    "CacheError",
    "CacheMismatch",
    "CacheWriter",
    "CorruptCache",
    "IncompleteCache",
    "VerifyError",
    "block_shuffle",
    "cache_key",
    "cache_key_at",
    "check_encoding_options",
    "complete_manifest",
    "convert",
    "describe",
    "make_plan",
    "open_cache",
    "part_rows",
    "statistics",
    "verify",
]
