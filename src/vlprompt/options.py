"""One option descriptor for every configuration key: type, default, range or choices, help.

The run configuration's sections (``train``, ``data``, ``backbone``, ``model``) and every method's
options (``options``) are dataclasses whose fields are declared with :func:`option`.  A dataclass
built on :class:`Options` checks (and, where lossless, converts) each value against its annotation,
its range and its choices when it is constructed, whoever constructs it, with one-line errors naming
the key and the valid values -- so a value is validated in exactly one place.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from vlprompt.errors import VlpromptError, unknown_name


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    execution: bool = False,
) -> Any:
    """A configuration key: its default, a one-line help, and optionally its valid values.

    ``minimum`` / ``maximum`` are inclusive bounds, ``above`` / ``below`` exclusive ones; ``choices``
    lists the valid values.  ``execution`` keys never change a result (device, logging, evaluation
    batch size), so they are left out of the run's fingerprint.  Mutable defaults are copied per use.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "below": below,
        "execution": execution,
    }
    if isinstance(default, (dict, list, set)):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return field(default=default, metadata=meta)


def type_name(tp: Any) -> str:
    """``int`` -> "an integer", ``float | None`` -> "a number (or null)" ..."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tail = " (or null)" if type(None) in typing.get_args(tp) else ""
        return " or ".join(type_name(a) for a in args) + tail
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping {{{type_name(k)}: {type_name(v)}}}"
    if origin in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the annotation ``tp``."""

    def bad() -> VlpromptError:
        return VlpromptError(f"{name}={value!r} is invalid; it must be {type_name(tp)}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except VlpromptError:
                continue
        raise bad()
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise bad()
        return {coerce(k, kt, f"{name} key"): coerce(v, vt, f"{name}[{k}]") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (et,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, et, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value_f = float(value.strip())
            except ValueError:
                raise bad() from None
        elif isinstance(value, (int, float)):
            value_f = float(value)
        else:
            raise bad()
        if not math.isfinite(value_f):
            raise VlpromptError(f"{name}={value!r} is invalid; it must be a finite number")
        return value_f
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def bounds_text(meta: Mapping[str, Any]) -> str:
    """``">= 0 and < 1"`` from a field's bounds ("" when it has none)."""
    parts = []
    for key, rel in (("minimum", ">="), ("above", ">"), ("maximum", "<="), ("below", "<")):
        if meta.get(key) is not None:
            parts.append(f"{rel} {meta[key]:g}")
    return " and ".join(parts)


def check_value(value: Any, meta: Mapping[str, Any], name: str, raw: Any, tp: Any) -> None:
    """One-line error when ``value`` is not among the field's choices or outside its bounds."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise VlpromptError(f"{name}={raw!r} is invalid; choose one of: {', '.join(map(str, choices))}")
    if isinstance(value, Mapping):  # a table (epochs per shots): its bounds hold for every value
        for k, v in value.items():
            check_value(v, {**meta, "choices": None}, f"{name}[{k}]", v, type(v))
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, lo_open = (meta["above"], True) if meta.get("above") is not None else (meta.get("minimum"), False)
    hi, hi_open = (meta["below"], True) if meta.get("below") is not None else (meta.get("maximum"), False)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        kind = "an integer" if tp is int else "a number"
        raise VlpromptError(f"{name}={raw!r} is invalid; it must be {kind} {bounds_text(meta)}")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (memoised per class)."""
    return typing.get_type_hints(cls)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


@dataclass
class Options:
    """Base of every configuration section: values are checked once, when the section is built.

    ``section`` names the section in error messages and ``vlprompt config show`` (``train``,
    ``options`` ...).
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        tps = hints(type(self))
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            name = f"{self.section}.{f.name}" if self.section else f.name
            value = coerce(raw, tps.get(f.name, Any), name)
            check_value(value, f.metadata, name, raw, tps.get(f.name))
            if value is not raw:
                object.__setattr__(self, f.name, value)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, values: Mapping[str, Any], where: str | None = None) -> Any:
        """The section from ``values`` (defaults for missing keys); unknown keys name the valid ones."""
        if not isinstance(values, Mapping):
            raise VlpromptError(f"section '{where or cls.section}' must be a mapping of keys, got {values!r}")
        valid = cls.keys()
        bad = [k for k in values if k not in valid]
        if bad:
            raise unknown_name(f"{where or cls.section} key", str(bad[0]), valid)
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def describe(cls, prefix: str | None = None) -> list[dict[str, Any]]:
        """Every key as ``{key, type, default, help, execution}`` (``vlprompt config show``)."""
        tps = hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            help_ = str(f.metadata.get("help", ""))
            if f.metadata.get("choices"):
                help_ += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            if bounds_text(f.metadata):
                help_ += f" ({bounds_text(f.metadata)})"
            rows.append(
                {
                    "key": f"{prefix or cls.section}.{f.name}",
                    "type": type_name(tps.get(f.name, Any)),
                    "default": field_default(f),
                    "help": help_,
                    "execution": bool(f.metadata.get("execution")),
                }
            )
        return rows


def plain(v: Any) -> Any:
    """Dataclasses, mappings and sequences as plain JSON/YAML values."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v
