"""Strict request parsing: JSON objects with known fields of known types, ISO 8601 times.

Everything here runs before the first write, so bad input changes nothing (DESIGN
invariant 5). Each failure is an :class:`ApiError` with a precise code and the offending
field in ``details.field``.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, inspect

from api.errors import ApiError
from api.schemas import INT64, MAX_JSON_DEPTH

S = TypeVar("S", bound=msgspec.Struct)


def invalid(code: str, message: str, field: str | None = None, **details: Any) -> ApiError:
    if field is not None:
        details = {"field": field, **details}
    return ApiError(400, code, message, details=details)


# ---- bodies ---------------------------------------------------------------------------
def parse_body(body: bytes, content_type: str | None, shape: type[S], *,
               optional: bool = False) -> S:
    """The body decoded into ``shape`` (a Struct of api/schemas.py); an empty body is the
    Struct's defaults when the body is optional.

    The happy path is one msgspec decode plus :func:`check_storable` over the free-form
    values. A body msgspec refuses is decoded again generically to answer exactly as the
    rules are ranked: unreadable, not an object, not storable (NUL, depth, 64-bit range),
    unknown field, then the first field msgspec names (missing, wrong type, bad string).
    """
    if not body.strip():
        if optional:
            return shape()
        raise invalid("MISSING_BODY", "a JSON object body is required")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "the body must be application/json",
                       details={"contentType": content_type or ""})
    try:
        parsed = _decoder(shape).decode(body)
    except msgspec.DecodeError:  # ValidationError included
        return _explain(body, shape)
    for name in _free_form(shape):
        value = getattr(parsed, name)
        if value is not UNSET:
            check_storable(value, depth=2)
    return parsed


def _explain(body: bytes, shape: type[S]) -> S:
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise invalid("MALFORMED_JSON", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid("INVALID_BODY", "the body must be a JSON object")
    check_storable(value)
    fields = _fields(shape)
    for name in value:
        if name not in fields:
            raise invalid("UNKNOWN_FIELD", f"unknown field {name!r}", name,
                          allowed=sorted(fields))
    for name, (kinds, _) in fields.items():
        v = value.get(name)
        if "integer" in kinds and isinstance(v, float) and v.is_integer():
            value[name] = int(v)  # JSON does not tell 2 from 2.0
    try:
        return msgspec.convert(value, shape)
    except msgspec.ValidationError as exc:
        raise _field_error(str(exc), fields) from None


_MISSING_RE = re.compile(r"Object missing required field `([^`]+)`")
_AT_RE = re.compile(r"- at `\$\.([A-Za-z0-9_]+)")


def _field_error(message: str, fields: dict[str, tuple[list[str], int | None]]) -> ApiError:
    if m := _MISSING_RE.match(message):
        return invalid("MISSING_FIELD", f"{m[1]} is required", m[1])
    m = _AT_RE.search(message)
    if m is None or m[1] not in fields:
        return invalid("INVALID_BODY", message)
    name = m[1]
    kinds, max_length = fields[name]
    if ", got `" in message:
        return invalid("INVALID_FIELD_TYPE", f"{name} has the wrong type", name,
                       expected=kinds)
    return invalid("INVALID_FIELD", f"{name} must be 1..{max_length} characters, "
                   "not all blank, without control characters", name)


@cache
def _decoder(shape: type) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(shape)


_JSON_TYPES = {inspect.StrType: "string", inspect.IntType: "integer",
               inspect.BoolType: "boolean", inspect.DictType: "object",
               inspect.ListType: "array", inspect.FloatType: "number"}


@cache
def _fields(shape: type) -> dict[str, tuple[list[str], int | None]]:
    """JSON name -> (its JSON types, a string's max length) of each field of ``shape``."""
    out = {}
    for f in inspect.type_info(shape).fields:
        kinds = _kinds(f.type)
        out[f.encode_name] = ([_JSON_TYPES[type(k)] for k in kinds],
                              next((k.max_length for k in kinds
                                    if isinstance(k, inspect.StrType)), None))
    return out


@cache
def _free_form(shape: type) -> tuple[str, ...]:
    """Fields holding arbitrary JSON (metadata, lists) or integers: checked by
    :func:`check_storable` (a string field's pattern already refuses NUL)."""
    return tuple(f.name for f in inspect.type_info(shape).fields
                 if any(isinstance(k, (inspect.DictType, inspect.ListType, inspect.IntType))
                        for k in _kinds(f.type)))


def _kinds(t: inspect.Type) -> list[inspect.Type]:
    """The JSON types a field accepts (``UNSET`` is absence, not a type)."""
    while isinstance(t, inspect.Metadata):
        t = t.type
    if isinstance(t, inspect.UnionType):
        return [k for u in t.types for k in _kinds(u)]
    return [t]


def check_storable(value: Any, depth: int = 1) -> None:
    """Refuse what Postgres cannot store or a serializer on the path cannot carry: NUL in
    any string (keys included), nesting deeper than :data:`MAX_JSON_DEPTH`, numbers outside
    the signed 64-bit range (Lua's cjson reads every number as a double; msgspec keeps
    integers exact, so the range is checked on the value itself). ``depth`` is the level of
    ``value`` (the body is level 1)."""
    lo, hi = INT64
    stack: list[tuple[Any, int]] = [(value, depth)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise invalid("INVALID_CHARACTER", "strings must not contain NUL (\\u0000)")
        elif isinstance(node, dict):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            for k, v in node.items():
                if "\x00" in k:
                    raise invalid("INVALID_CHARACTER", "keys must not contain NUL (\\u0000)")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if not lo <= node <= hi:
                raise _out_of_range()


def _out_of_range() -> ApiError:
    return invalid("NUMBER_OUT_OF_RANGE",
                   "numbers must lie within the signed 64-bit integer range")


def _too_deep() -> ApiError:
    return invalid("NESTING_TOO_DEEP", f"JSON may nest at most {MAX_JSON_DEPTH} levels",
                   maxDepth=MAX_JSON_DEPTH)


def given(value: Any) -> Any:
    """A Struct field's value, ``None`` when the body did not carry it."""
    return None if value is UNSET else value


# ---- times (engine/times.py: the service parses them too) ---------------------------------
from engine.times import format_time, parse_range, parse_time  # noqa: E402

__all__ = ["format_time", "parse_range", "parse_time"]


# ---- query strings and headers ----------------------------------------------------------
def parse_if_match(value: str | None) -> int | None:
    """``If-Match: <version>`` (an ETag-quoted ``"3"`` is accepted too)."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise invalid("INVALID_IF_MATCH", "If-Match must be the reservation version",
                      "If-Match")
    return int(text)
