"""Strict request parsing: JSON objects with known fields of known types, ISO 8601 times.

Everything here runs before the first write, so bad input changes nothing (DESIGN
invariant 5). Each failure is an :class:`ApiError` with a precise code and the offending
field in ``details.field``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from api.errors import ApiError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
# ISO 8601 date-time with an explicit offset (Z or ±hh:mm); no naive times, no week dates.
_ISO_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|z|[+-]\d{2}:\d{2})$")


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
    return value


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


# ---- times ----------------------------------------------------------------------------
def parse_time(value: Any, field: str) -> int:
    """An ISO 8601 timestamp with an offset, as ms since the epoch (whole ms only)."""
    if not isinstance(value, str) or not _ISO_RE.match(value):
        raise invalid("INVALID_TIMESTAMP",
                      f"{field} must be an ISO 8601 timestamp with an offset "
                      "(e.g. 2030-01-01T09:00:00Z)", field)
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise invalid("INVALID_TIMESTAMP", f"{field} is not a valid date-time", field) from None
    if moment.tzinfo is None or moment.utcoffset() is None:  # the regex already demands one
        raise invalid("INVALID_TIMESTAMP", f"{field} needs a UTC offset", field)
    try:
        # Exact integer arithmetic (floats lose ms far from 1970); sub-ms digits are dropped.
        delta = moment - EPOCH
        ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    except (OverflowError, ValueError):  # an offset pushes it past year 1 or 9999
        raise invalid("INVALID_TIMESTAMP", f"{field} is out of range", field) from None
    if not MIN_MS <= ms <= MAX_MS:
        raise invalid("INVALID_TIMESTAMP", f"{field} is out of range", field)
    return ms


def format_time(ms: int | None) -> str | None:
    """ms since the epoch as ISO 8601 UTC with a ``Z`` (milliseconds only when non-zero)."""
    if ms is None:
        return None
    moment = EPOCH + timedelta(milliseconds=ms)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def parse_range(start: Any, end: Any, start_field: str, end_field: str) -> tuple[int, int]:
    start_ms, end_ms = parse_time(start, start_field), parse_time(end, end_field)
    if end_ms <= start_ms:
        raise invalid("INVALID_TIME_RANGE", f"{end_field} must be after {start_field}",
                      end_field)
    return start_ms, end_ms


# ---- query strings and headers ----------------------------------------------------------
def query_params(params, allowed: set[str]) -> dict[str, str]:
    """A flat dict of the query; unknown or repeated parameters are refused."""
    out: dict[str, str] = {}
    for name, value in params.multi_items():
        if name not in allowed:
            raise invalid("UNKNOWN_PARAMETER", f"unknown query parameter {name!r}", name,
                          allowed=sorted(allowed))
        if name in out:
            raise invalid("REPEATED_PARAMETER", f"{name} is given more than once", name)
        if "\x00" in value:
            # Postgres refuses NUL in text: answer 400 here, not 500 there (the OpenAPI
            # document says so with NO_NUL).
            raise invalid("INVALID_PARAMETER", f"{name} contains a NUL character", name)
        out[name] = value
    return out


def parse_bool(value: str, field: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise invalid("INVALID_PARAMETER", f"{field} must be true or false", field)


def parse_int(value: str, field: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", value):
        raise invalid("INVALID_PARAMETER", f"{field} must be an integer", field)
    number = int(value)
    if not low <= number <= high:
        raise invalid("INVALID_PARAMETER", f"{field} must be between {low} and {high}", field,
                      minimum=low, maximum=high)
    return number


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
