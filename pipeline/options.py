"""Each option stated once. A stage's config is a dataclass whose fields carry their default, help, choices and range
(`option(...)`); the command line's options (`click_options`), the config files' keys (the flag names, as the
Snakefile passes them) and the checks (`validate`, called by each config's __post_init__) all come from there.
A field whose type is another config dataclass is a group of options: its fields are flags of the same command."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field, fields

import click

from pipeline.errors import OptionError


def option(default=MISSING, help: str = "", *, choices=None, low=None, high=None, above=None, flag: str | None = None,
           finite: bool = False, cli: bool = True, factory=None):
    """A config field. low/high: inclusive bounds; above: an exclusive lower bound; finite: no NaN or infinity;
    flag: the command-line name when it is not the field's (--field-name); cli=False: not a command-line option."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high, "above": above,
            "flag": flag, "finite": finite, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_group(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _base(tp):
    """(scalar type, multiple) of an annotation: int | None → (int, False), tuple[float, ...] → (float, True)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return args[0], True
    if args and origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _base(args[0]) if len(args) == 1 else (str, False)
    return tp, False


# ---------------------------------------------------------------- checks

def validate(cfg) -> None:
    """Every field's choices and range, for a config and its groups; OptionError names the flag."""
    hints = _hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if _is_group(hints[f.name]) and value is not None:
            validate(value)
            continue
        for v in (value if isinstance(value, (tuple, list)) else [value]):
            problem = _problem(f, v)
            if problem:
                raise OptionError(f"{flag_of(f)} {v!r} {problem}")


def _problem(f: dataclasses.Field, v) -> str | None:
    m = f.metadata
    if v is None or isinstance(v, bool):
        return None
    if m.get("choices") and v not in m["choices"]:
        return f"is not one of {', '.join(map(str, m['choices']))}"
    if not isinstance(v, (int, float)):
        return None
    if (m.get("finite") or any(m.get(k) is not None for k in ("low", "high", "above"))) and not math.isfinite(v):
        return "must be a finite number"
    if m.get("low") is not None and v < m["low"]:
        return f"must be at least {m['low']}"
    if m.get("high") is not None and v > m["high"]:
        return f"must be at most {m['high']}"
    if m.get("above") is not None and v <= m["above"]:
        return f"must be above {m['above']}"
    return None


# ---------------------------------------------------------------- the command line

def click_options(cls, exclude: tuple = ()):
    """A decorator adding one click option per field of cls (and of its groups), named by flag_of, with the field's
    default, help and choices. The command receives them flat, by field name; from_flags() builds the config."""
    def decorate(fn):
        for f in reversed(list(_cli_fields(cls, exclude))):
            fn = _click_option(f, _hints_of_field(cls, f))(fn)
        return fn
    return decorate


def _cli_fields(cls, exclude):
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        if _is_group(hints[f.name]):
            yield from _cli_fields(hints[f.name], exclude)
        else:
            yield f


def _hints_of_field(cls, target):
    """The annotation of a field, looked up in cls or in its groups."""
    hints = _hints(cls)
    for f in fields(cls):
        if f is target:
            return hints[f.name]
        if _is_group(hints[f.name]):
            try:
                return _hints_of_field(hints[f.name], target)
            except LookupError:
                continue
    raise LookupError(target.name)


def _click_option(f: dataclasses.Field, tp):
    base, multiple = _base(tp)
    default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                          else None)
    kw = {"help": f.metadata.get("help") or None, "required": f.default is MISSING and f.default_factory is MISSING}
    if base is bool:
        return click.option(flag_of(f), f.name, is_flag=True, default=bool(default), **kw)
    choices = f.metadata.get("choices")
    click_type = click.Choice([str(c) for c in choices]) if choices and base is str else base
    if multiple:
        return click.option(flag_of(f), f.name, type=click_type, multiple=True, default=tuple(default or ()), **kw)
    return click.option(flag_of(f), f.name, type=click_type, default=default, show_default=default is not None, **kw)


def from_flags(cls, flat: dict, **fixed):
    """cls from flat field values (as click passes them), filling its groups from the same values; `fixed` sets
    fields the command builds itself (nested data configs, say)."""
    hints = _hints(cls)
    kw = {}
    for f in fields(cls):
        if f.name in fixed:
            kw[f.name] = fixed[f.name]
        elif _is_group(hints[f.name]):
            kw[f.name] = from_flags(hints[f.name], flat)
        elif f.name in flat:
            value = flat[f.name]
            kw[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kw)


def flat(cfg) -> dict:
    """A config as {field name: value}, its groups' fields included (the flags' names with _ for -)."""
    out = {}
    hints = _hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if _is_group(hints[f.name]) and value is not None:
            out.update(flat(value))
        else:
            out[f.name] = value
    return out
