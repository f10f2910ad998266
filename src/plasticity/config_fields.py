"""The field machinery under `plasticity.config`: declaring, checking and parsing fields.

A config field is declared with `option(default, doc, check)`; `build` turns a parsed YAML
mapping into the dataclass, coercing every value to its annotation and running its check,
and collects one message per bad field, each naming the field's dotted path. Nothing here
knows the stages; `plasticity.config` holds the dataclasses and the checks across fields.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

Check = Callable[[Any], str | None]

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot run. `errors` holds one message per bad field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.errors))


def option(default: Any, doc: str, check: Check | None = None) -> Any:
    """A dataclass field with its docstring and value check.

    A list or dict default becomes a factory of copies, so instances never share it.
    """
    metadata = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- field checks: each returns an error message or None -------------------------------
# The leading underscore keeps them apart from field names: the dataclass bodies in
# plasticity.config name them bare, and there a field such as ConceptConfig.positive
# would shadow a check called `positive` for every field after it.


def _positive(v: Any) -> str | None:
    return None if v is None or v > 0 else f"expected a positive number, got {v!r}"


def _non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else f"expected a number >= 0, got {v!r}"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"expected a number in [0, 1), got {v!r}"


def _non_empty(v: Any) -> str | None:
    return None if v else "expected a non-empty value"


def _web_address(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and re.match(r"^https?://[^/\s]+", v)):
        return None
    return f"expected an http:// or https:// address, got {v!r}"


def _non_negative_items(v: Any) -> str | None:
    if v is None:
        return None
    bad = [x for x in v if x < 0]
    return f"expected values >= 0, got {bad}" if bad else None


def _layer_sets(v: Any) -> str | None:
    """One list of layers or a list of layer lists, none empty, every layer >= 0."""
    if v is None:
        return None
    if not v:
        return "expected a non-empty list of layers (or of layer lists)"
    sets = v if isinstance(v[0], list) else [v]
    if any(not s for s in sets):
        return "expected every layer set to be non-empty"
    bad = [x for s in sets for x in s if x < 0]
    return f"expected layers >= 0, got {bad}" if bad else None


# -- parsing ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the value in canonical form."""
    origin = typing.get_origin(tp)
    bad = object()
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _coerce(value, arg, path, sub)
            if not sub:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return bad
        return [_coerce(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return bad
        return build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "2e-4" (no dot) as a string; take it as the number it spells.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return bad


def build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    """`cls` from a mapping; every bad field appends a message to `errors`.

    Missing and bad fields keep their defaults, so the caller decides from `errors`
    whether the result can be used.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields))
            errors.append(f"{where}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        n_before = len(errors)
        value = _coerce(data[name], hints[name], path, errors)
        if len(errors) > n_before:
            continue
        check = f.metadata.get("check")
        if check is not None:
            # Report the value as written (-1, not -1.0).
            raw = data[name]
            msg = check(raw if isinstance(value, float) and isinstance(raw, int) else value)
            if msg:
                errors.append(f"{path}: {msg}")
                continue
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defaults cover every field
        errors.append(f"{prefix or 'config'}: {exc}")
        return None
    return obj


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Every field's dotted name and docstring, nested dataclasses flattened."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], name + "."))
        else:
            out[name] = f.metadata.get("doc", "")
    return out
