"""Config fields: their type checks, and the one parser of dotted overrides (``a.b=value``).

Works on any tree of frozen dataclasses: :class:`gptjax.config.Config` (``model.n_layer=4``),
:class:`gptjax.finetune.FinetuneConfig` (``body_lr=1e-4``) and a sweep's axes alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from gptjax.errors import GptjaxError


def check(ok: bool, message: str) -> None:
    if not ok:
        raise GptjaxError(message)


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value >= 1, f"{name} ({value}) must be >= 1")


def check_types(obj: Any) -> None:
    """Raise unless ``obj``'s int, float, str and Literal fields hold what they say."""
    # Not only the override parser checks these: a config file that builds
    # ModelConfig(position="alibi") or n_layer=2.5 must fail, not train something else.
    for name, annotation in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if annotation in (int, float):
            what = "an integer" if annotation is int else "a finite number"
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if annotation is float:
                ok = (
                    ok or isinstance(value, numbers.Real) and not isinstance(value, bool)
                ) and math.isfinite(value)
            check(ok, f"{name} ({value!r}) must be {what}")
        if annotation is str:  # a lone surrogate (invalid UTF-8 on the command line) encodes nowhere
            check(isinstance(value, str), f"{name} ({value!r}) must be a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise GptjaxError(f"{name} ({value!r}) is not valid UTF-8 text") from None
        if typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            check(value in choices, f"{name} ({value!r}) must be one of {list(choices)}")


def apply_overrides(tree: Any, overrides: Iterable[str], *, what: str = "config key", strip: str = "") -> Any:
    """``tree`` with ``a.b=value`` strings applied; unknown keys and bad types are one-line errors.

    Args:
        tree: a frozen dataclass, possibly holding others (``Config.model``).
        overrides: ``key=value`` strings; a leading ``--`` and ``strip`` are removed from keys.
        what: what a key is called in errors (``"fine-tune config key"``).
    """
    return replace(tree, parse(type(tree), overrides, what=what, strip=strip), what=what)


def parse(
    cls: type, overrides: Iterable[str], *, what: str = "config key", strip: str = ""
) -> dict[str, Any]:
    """``{dotted key: typed value}`` from ``key=value`` strings, checked against ``cls``'s fields."""
    nested = any(dataclasses.is_dataclass(t) for t in typing.get_type_hints(cls).values())
    changes = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        key = key.removeprefix(strip) if strip else key
        if not sep:
            raise GptjaxError(f"override {item!r} must look like {'section.' if nested else ''}field=value")
        changes[key] = _parse_value(key, raw, _annotation(cls, key, what))
    return changes


def replace(tree: Any, changes: Mapping[str, Any], *, what: str = "config key") -> Any:
    """``tree`` with each dotted key set to its value (the dataclasses validate the values)."""
    by_head: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        _annotation(type(tree), key, what)
        head, _, rest = key.partition(".")
        by_head.setdefault(head, {})[rest] = value
    new = {}
    for head, sub in by_head.items():
        if "" in sub:
            new[head] = sub[""]
        else:
            new[head] = replace(getattr(tree, head), sub, what=what)
    return dataclasses.replace(tree, **new)


def _annotation(cls: type, key: str, what: str) -> Any:
    """The type of the field a dotted key names; an unknown key raises, listing what is there."""
    parts = key.split(".")
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if name not in hints:
            where = f"{'.'.join(parts[:i])} has" if i else "fields:"
            raise GptjaxError(f"unknown {what} {key!r}; {where} {', '.join(hints)}")
        cls = hints[name]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise GptjaxError(f"{what} {key!r} is a section: set {key}.<field>")
    return cls


def _parse_value(key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if raw not in choices:
            raise GptjaxError(f"{key}={raw!r} is not one of {list(choices)}")
        return raw
    if origin in (typing.Union, types.UnionType):
        raise GptjaxError(f"{key} cannot be set from the command line")  # no such fields yet
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise GptjaxError(f"{key}={raw!r} is not a boolean (true/false)")
    if annotation is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise GptjaxError(f"{key}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise GptjaxError(f"{key}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise GptjaxError(f"{key}={raw!r} must be finite")
        return value
    return raw
