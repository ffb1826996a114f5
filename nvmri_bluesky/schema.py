"""pydantic building blocks of the typed documents (scenarios, pulse programs).

The models are pydantic dataclasses with :data:`CONFIG` (unknown keys refused,
instances frozen), so they keep positional construction,
``dataclasses.replace`` and ``dataclasses.asdict``.  Field types here refuse
what JSON would otherwise coerce (``"1"`` or ``true`` for a number) with a
reason in plain words, and :func:`first_error` turns a
:class:`pydantic.ValidationError` into the key path and reason of its first
error, the two halves of the package's one-line refusals.

A validator that checks several fields raises :func:`problem` with ``at``, the
key path below the model it validates (``"z_nm"``, ``"points[0]"``), so the
refusal names the key, not the model.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["CONFIG", "Finite", "Integer", "Real", "Text", "problem", "sequence", "short",
           "type_name", "first_error", "dotted"]

CONFIG = ConfigDict(extra="forbid", frozen=True)
"""Configuration of every document model: unknown keys refused, frozen."""


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line refusals."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def type_name(value: Any) -> str:
    """What a JSON value is, in words (``"a string"``, ``"a list"``, ``"int"``)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def problem(why: str, at: str = "") -> PydanticCustomError:
    """The error a validator raises: ``why`` in plain words, at key path ``at`` below it."""
    return PydanticCustomError("nvmri", "{why}", {"why": why, "at": at})


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem(f"expected a number, got {type_name(value)} {short(value)}")
    return value


def _finite(value: Any) -> float:
    if not math.isfinite(_number(value)):
        raise problem(f"expected a finite number, got {short(value)}")
    return float(value)


def _integer(value: Any) -> int:
    if not float(_number(value)).is_integer():
        raise problem(f"expected an integer, got {short(value)}")
    return int(value)


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem(f"expected a number, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"expected a string, got {type_name(value)} {short(value)}")
    return value


Finite = Annotated[float, BeforeValidator(_finite)]
"""A finite number (an integer is taken as a float; booleans and strings are refused)."""
Integer = Annotated[int, BeforeValidator(_integer)]
"""An integral number (``2.0`` is taken as 2)."""
Real = Annotated[float, BeforeValidator(_real)]
"""Any number, NaN and infinities included (checked later by who needs them finite)."""
Text = Annotated[str, BeforeValidator(_text)]
"""A string."""


def sequence(length: int | None = None, what: str = "") -> BeforeValidator:
    """A JSON list (or tuple), of ``length`` numbers when given; refused in words otherwise.

    ``what`` (``" of gates"``) names the items in the refusal instead of the value.
    """
    def check(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            got = "" if what else f", got {type_name(value)} {short(value)}"
            raise problem(f"expected a list{what}{got}")
        if length is not None and len(value) != length:
            raise problem(f"expected {length} numbers, got {len(value)}")
        return value
    return BeforeValidator(check)


def dotted(keys: tuple[Any, ...] | list[Any]) -> str:
    """A key path as text: ``("points", 0, "z_nm")`` -> ``"points[0].z_nm"``."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


_WORDS = {"missing": "missing", "unexpected_keyword_argument": "unknown key",
          "extra_forbidden": "unknown key", "invalid_key": "unknown key"}


def first_error(exc: ValidationError) -> tuple[tuple[Any, ...], str, str, Any]:
    """The first error of ``exc``: its key path (``at`` included), kind, reason and value.

    Returns
    -------
    keys : tuple
        Keys and list indices from the document's root to the bad value.
    kind : str
        pydantic's error type (``"missing"``, ``"nvmri"`` for ours, ...).
    why : str
        The reason in plain words.
    value
        The refused value.
    """
    errors = exc.errors(include_url=False)           # an unknown key first, then a missing one
    error = min(errors, key=lambda e: (_WORDS.get(e["type"]) != "unknown key",
                                       e["type"] != "missing"))
    keys, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    if kind == "invalid_key":                 # a key that is not a string: name it
        keys = (*keys[:-1], str(error["input"]))
    if ctx.get("at"):
        keys += tuple(_split(ctx["at"]))
    if kind == "nvmri":
        why = ctx["why"]
    elif kind in ("dataclass_type", "model_type", "dict_type"):
        why = f"expected an object, got {type_name(error['input'])}"
    else:
        why = _WORDS.get(kind, error["msg"])
    return keys, kind, why, error["input"]


def _split(path: str) -> list[Any]:
    """``"points[0].z_nm"`` -> ``["points", 0, "z_nm"]`` (the inverse of :func:`dotted`)."""
    keys: list[Any] = []
    for part in path.split("."):
        name, *indices = part.replace("]", "").split("[")
        keys += [name] if name else []
        keys += [int(i) for i in indices]
    return keys
