"""Strict request parsing: JSON objects with known fields of known types, ISO 8601 times.

Everything here runs before the first write, so bad input changes nothing (DESIGN
invariant 5). Each failure is an :class:`ApiError` with a precise code and the offending
field in ``details.field``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from api.errors import ApiError


CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def invalid(code: str, message: str, field: str | None = None, **details: Any) -> ApiError:
    if field is not None:
        details = {"field": field, **details}
    return ApiError(400, code, message, details=details)


# ---- bodies ---------------------------------------------------------------------------
def json_object(body: bytes, content_type: str | None, *, optional: bool = False) -> dict:
    """The body as a JSON object; an empty body is ``{}`` when the body is optional."""
    if not body.strip():
        if optional:
            return {}
        raise invalid("MISSING_BODY", "a JSON object body is required")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "the body must be application/json",
                       details={"contentType": content_type or ""})
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid("MALFORMED_JSON", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid("INVALID_BODY", "the body must be a JSON object")
    check_storable(value, body)
    return value


MAX_JSON_DEPTH = 32  # every serializer on the path (orjson, Lua cjson, jsonb) handles far more
INT64 = (-(2**63), 2**63 - 1)


def check_storable(value: Any, raw: bytes = b"") -> None:
    """Refuse what Postgres cannot store or a serializer on the path cannot carry: NUL in
    any string (keys included), nesting deeper than :data:`MAX_JSON_DEPTH`, numbers outside
    the signed 64-bit range (an integer beyond it comes back as a float, and Lua's cjson
    reads every number as a double)."""
    lo, hi = INT64
    ambiguous = False
    stack: list[tuple[Any, int]] = [(value, 1)]
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
            # orjson reads an integer beyond 64 bits as a float; just below -2**63 it rounds
            # to the bound itself: only the text tells what was written.
            ambiguous = ambiguous or (isinstance(node, float) and node == lo)
    if ambiguous:
        import json

        def integer(text: str) -> int:
            if not lo <= int(text) <= hi:
                raise _out_of_range()
            return int(text)

        json.loads(raw, parse_int=integer)


def _out_of_range() -> ApiError:
    return invalid("NUMBER_OUT_OF_RANGE",
                   "numbers must lie within the signed 64-bit integer range")


def _too_deep() -> ApiError:
    return invalid("NESTING_TOO_DEEP", f"JSON may nest at most {MAX_JSON_DEPTH} levels",
                   maxDepth=MAX_JSON_DEPTH)




@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: type | tuple[type, ...]
    required: bool = False
    max_length: int = 256


def check_fields(body: dict, fields: list[Field]) -> dict:
    """Refuse unknown fields, missing required ones and wrong JSON types."""
    known = {f.name: f for f in fields}
    for name in body:
        if name not in known:
            raise invalid("UNKNOWN_FIELD", f"unknown field {name!r}", name,
                          allowed=sorted(known))
    for f in fields:
        if f.name not in body:
            if f.required:
                raise invalid("MISSING_FIELD", f"{f.name} is required", f.name)
            continue
        value = body[f.name]
        kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
        if int in kinds and isinstance(value, float) and value.is_integer():
            value = body[f.name] = int(value)  # JSON does not tell 2 from 2.0
        # bool is an int in Python; JSON true is never a number here.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise invalid("INVALID_FIELD_TYPE", f"{f.name} has the wrong type", f.name,
                          expected=[_json_type(k) for k in kinds])
        if isinstance(value, str) and (not value.strip() or len(value) > f.max_length
                                       or CONTROL_RE.search(value)):
            raise invalid("INVALID_FIELD", f"{f.name} must be 1..{f.max_length} characters, "
                          "not all blank, without control characters", f.name)
    return body


def _json_type(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array",
            type(None): "null", float: "number"}.get(kind, kind.__name__)


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
