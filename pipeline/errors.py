"""Errors that mean the input is wrong, not the code. The command line prints these (and the storage layer's
CacheError) as one line `error: …`; every other exception is a bug or a failure of the machine and keeps its
traceback. `pipeline --debug` (or DISTILL_DEBUG=1) shows the traceback of these too."""

from storage.errors import CacheError


class InputError(ValueError):
    """Bad input: an option, a file, a model or data that cannot be used as asked; the message says the fix."""


class OptionError(InputError):
    """An option's value, or a combination of options."""


class DataError(InputError):
    """A dataset that cannot be read or tokenized as asked."""


class ModelError(InputError):
    """A model or tokenizer that cannot be loaded or used as asked."""


class RunError(InputError):
    """A run folder that cannot be used as asked: another run's, an input's, or one with nothing to resume."""


class Diverged(InputError):
    """Training produced more non-finite losses than allowed."""


ONE_LINE = (InputError, CacheError)


def extra(module: str, purpose: str):
    """An optional dependency of the `report` extra, or a one-line OptionError naming how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptionError(f"{purpose} needs {module}: pip install 'distill-cache[report]'") from None
