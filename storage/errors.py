"""The storage layer's errors: each means the input (a path, a cache, an option) is unusable, never a bug, and the
command line prints it as one line. Anything else raised in storage/ is a bug and keeps its traceback."""


class CacheError(ValueError):
    """A cache, or a request about one, that cannot be served as asked."""


class CacheMismatch(CacheError):
    """The destination holds something else: another cache, another run's files, or an input."""


class IncompleteCache(CacheError):
    """No manifest yet: writers have not finished."""


class CorruptCache(CacheError):
    """Bytes on disk that differ from what was written, or that break the format (names the part)."""


class CacheBusy(CacheError):
    """Another live process holds what this one needs."""


VerifyError = CorruptCache  # the name `pipeline verify` users know
