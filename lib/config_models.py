"""Config files validated by pydantic models, with one error line instead of pydantic's report.

Models built on ConfigModel refuse unknown keys and take YAML's types as written: "yes" is not true, 2.5 is not a
whole number, a text is not a mapping, and numbers are finite. The first problem becomes one UsageError:
`FILE: dotted.path.to.key: what is wrong; accepted: what the key takes`.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import annotated_types as at
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo

from lib import files
from lib.errors import UsageError


class Accepts:
    """Annotated metadata: what a key accepts, in words, where its type alone would say it badly."""

    def __init__(self, text: str):
        self.text = text


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    retired: ClassVar[dict[str, str]] = {}  # keys no code reads any more -> what to use instead

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data):
        """`key:` with nothing after it (YAML null, e.g. every entry commented out) takes the key's default."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if not (v is None and k in cls.model_fields and not cls.model_fields[k].is_required())}


def choice(noun: str, options) -> Any:
    """A type for one of `options` (all of one type); anything else is 'unknown <noun> <value>'."""
    options = tuple(options)

    def member(value):
        if value not in options:
            raise ValueError(f"unknown {noun} {value!r}")
        return value

    return Annotated[type(options[0]), AfterValidator(member), Accepts(", ".join(map(str, options)))]


# ---------------------------------------------------------------- reading and validating

def read_config(model: type[ConfigModel], path: str | Path, label: str, expect_mapping: str = "a YAML mapping"):
    return validate_model(model, files.load_yaml(path, label, expect_mapping), label)


def validate_model(model: type[ConfigModel], data, label: str):
    """`data` as an instance of `model`, or a UsageError naming `label`, the key, the problem and what it takes."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(error_line(model, exc.errors(include_url=False)[0], label)) from None


def error_line(model: type[BaseModel], error: dict, label: str) -> str:
    path, tp, meta, parent = _walk(model, error["loc"])
    if error["type"] == "extra_forbidden":
        advice = parent.retired.get(error["loc"][-1])
        what = f"not read by any code; {advice}" if advice else "unknown key"
        accepted = ", ".join(parent.model_fields)
    else:
        what, accepted = _problem(error, error["loc"][-1:] == ("[key]",)), describe(tp, meta)
    return f"{label}: {path + ': ' if path else ''}{what}; accepted: {accepted}"


def _walk(model, loc) -> tuple[str, Any, list, Any]:
    """Follow an error's location through the model's types: (dotted path, type there, its metadata, the model
    holding the last key)."""
    path, tp, meta, parent = "", model, [], model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        tp, meta = _unwrap(tp, meta)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent, path = tp, _join(path, part)
            field = tp.model_fields.get(part)
            if field is None:
                return path, Any, [], parent
            tp, meta = field.annotation, list(field.metadata)
        elif origin is dict:
            path = _join(path, part) if isinstance(part, str) and part.isidentifier() else f"{path}[{part!r}]"
            key_error = parts[:1] == ["[key]"]
            if key_error:
                parts.pop(0)
            tp, meta = get_args(tp)[0 if key_error else 1], []
        elif origin is list:
            path += f"[{part}]"
            tp, meta = get_args(tp)[0], []
        else:
            break
    tp, meta = _unwrap(tp, meta)
    return path, tp, meta, parent


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unwrap(tp, meta: list) -> tuple[Any, list]:
    """Strip Annotated (collecting its metadata) and Optional."""
    meta = list(meta)
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            tp = args[0]
            for m in args[1:]:
                meta += m.metadata if isinstance(m, FieldInfo) else [m]
        elif origin in (Union, types.UnionType) and type(None) in get_args(tp):
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp, meta


def describe(tp, meta: list) -> str:
    """What a value of this type (and these constraints) may be, in words."""
    tp, meta = _unwrap(tp, meta)
    hint = next((m.text for m in reversed(meta) if isinstance(m, Accepts)), None)  # the outermost wins
    if hint:
        return hint
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        return ("a whole number" if tp is int else "a number") + _bounds(meta)
    if tp is str:
        return "text"
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        return f"a list, each item {describe(args[0], [])}"
    if origin is dict:
        return f"a mapping of {describe(args[0], [])} to {describe(args[1], [])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"a mapping with keys {', '.join(tp.model_fields)}"
    return "a value"


_SIGNS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def _bounds(meta: list) -> str:
    found = {attr: getattr(m, attr) for m in meta for kind, attr, _ in _SIGNS if isinstance(m, kind)}
    if "ge" in found and "le" in found:
        return f" from {found['ge']} to {found['le']}"
    words = [f"{sign} {found[attr]}" for _, attr, sign in _SIGNS if attr in found]
    return " " + " and ".join(words) if words else ""


def _problem(error: dict, of_key: bool) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "missing"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "finite_number":
        return f"{value} is not a finite number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{shown(value)} is out of range"
    if kind in ("too_short", "too_long"):
        return f"found {len(value)} items"
    return f"found {'key ' if of_key else ''}{shown(value)}"


def shown(value) -> str:
    """A value as the person wrote it in YAML, short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if isinstance(value, str):
        return f"text {text}"
    return f"a list {text}" if isinstance(value, list) else text
