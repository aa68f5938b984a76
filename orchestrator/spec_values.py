"""How a job spec's values are read and checked: plain data -> typed dataclasses, command-line
text -> values, ranges and names (orchestrator.spec builds on it; imports no torch).

Every float is finite: `nan`, `inf`, `-inf` and `infinity` in any case are read as the floats
they spell and then refused as "not finite" (the JSON spellings NaN and Infinity alike).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal

from orchestrator.errors import UsageError


class SpecError(UsageError, ValueError):
    """A spec field is unknown or has a bad value; the message names it and what is allowed."""

    retryable = False  # a restart runs the same spec again (orchestrator.runtime.retryable)


def check_name(value: str, where: str) -> None:
    """Raise SpecError unless `value` is a name storage and MLflow keep apart (`x?y`, `x#y`)."""
    ok = value.isascii() and value[:1].isalnum()
    if not (ok and all(c.isalnum() or c in "._-" for c in value)):
        raise SpecError(f"{where}={value!r}: only letters, digits and . _ - (alphanumeric first)")


def check_ranges(section: str, config: Any, **rules: str) -> None:
    """Raise ValueError naming the first field of `config` outside its range. A rule is
    ">= 1", "> 0" or "0..1" (both ends included); a None value (an unset optional field)
    passes, a float that is not finite never does. `section` "" names top-level fields."""
    for name, rule in rules.items():
        value = getattr(config, name)
        if value is None:
            continue
        field = f"{section}.{name}" if section else name
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(not_finite(field, value))
        if ".." in rule:
            low, high = (float(x) for x in rule.split(".."))
            ok, allowed = low <= value <= high, f"between {rule.replace('..', ' and ')}"
        elif rule.startswith(">="):
            ok, allowed = value >= float(rule[2:]), rule
        elif rule.startswith(">"):
            ok, allowed = value > float(rule[1:]), rule
        else:
            raise AssertionError(f"bad range rule {rule!r} for {field}")
        if not ok:
            raise ValueError(f"{field}={value!r} is out of range: set it {allowed}")


def not_finite(where: str, value: float) -> str:
    return f"{where}={value}: not finite (nan or an infinity); give a finite number"


# ---------------------------------------------------------------- plain data -> dataclasses


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise SpecError(f"{where or 'spec'}: expected a mapping, got {data!r}")
    normalize = getattr(cls, "normalize_input", None)
    if normalize is not None:  # a section's own shorthand, e.g. scaling.num_workers=[2,8]
        data = normalize(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(data) - set(names)
    if unknown:
        raise SpecError(
            f"{where}{min(unknown)}: unknown key in section '{where.rstrip('.') or 'spec'}'; "
            f"valid keys: {', '.join(names)}"
        )
    kwargs = {name: _coerce(hints[name], data[name], f"{where}{name}") for name in data}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # a section's own checks (__post_init__)
        message = str(err)
        if (where and message.startswith(where)) or message.split("=")[0] in names:
            raise SpecError(message) from None  # it names its field already: no prefix
        raise SpecError(f"{where.rstrip('.') or 'spec'}: {message}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except SpecError as err:
                errors.append(str(err))
        raise SpecError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        item_types = args if origin is tuple and Ellipsis not in args else (args[0],) * len(value)
        if origin is tuple and len(item_types) != len(value):
            raise SpecError(f"{where}: expected {len(item_types)} values, got {value!r}")
        items = [_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise SpecError(
                f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        if tp is float and not math.isfinite(value):
            raise SpecError(not_finite(where, value))
        return value
    if tp is Any:
        return value
    raise SpecError(f"{where}: unsupported type {tp}")


# ------------------------------------------------------------------- command-line text


_NON_FINITE = {f"{sign}{word}" for sign in ("", "+", "-") for word in ("nan", "inf", "infinity")}


def parse_value(text: str) -> Any:
    """Command-line values: JSON where it parses (numbers, true/false, null, lists), the
    spellings of nan and the infinities in any case as floats, else a string."""
    if text.strip().lower() in _NON_FINITE:
        return float(text)  # refused as not finite where a float is expected, named as such
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(tp: Any, text: str) -> Any:
    """`text` as a value for a field of type `tp`: a string field keeps a scalar's text as
    written (name=123, tracking.tags.run=7), everything else goes through parse_value."""
    value = parse_value(text)
    wants_str = tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )
    if wants_str and isinstance(value, (int, float)):  # bool is an int too
        return text
    return value


def field_type(cls: type, parts: list[str]) -> tuple[Any, list[str]]:
    """The type at dotted path `parts` under dataclass `cls`, and the path's rest below a
    free mapping (dict field): ["tracking", "tags", "team"] -> (str, ["team"]) where
    tracking.tags is a dict[str, str]. (Any, []) where the path names no field."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return Any, []
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return Any, []
        tp = hints[part]
        if typing.get_origin(tp) is dict and i + 1 < len(parts):
            return typing.get_args(tp)[1], parts[i + 1 :]
    return tp, []
