"""ISO 8601 times of the partner contract, as integer milliseconds since the epoch.

Parsing is strict: an explicit offset of at most ±14:00 (the widest in use anywhere), and no
precision finer than the millisecond grid everything is stored on (``.0004Z`` is refused,
never truncated). Integer arithmetic throughout: floats lose milliseconds far from 1970.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.errors import ValidationError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z
MAX_OFFSET = timedelta(hours=14)  # Pacific/Kiritimati; nothing real is further from UTC
# ISO 8601 date-time with an explicit offset (Z or ±hh:mm); no naive times, no week dates.
_ISO_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|z|[+-]\d{2}:\d{2})$")
# What parse_time accepts, as one pattern (the OpenAPI document publishes it): fractions on
# the millisecond grid (trailing zeros allowed), offsets of at most ±14:00.
ISO_PATTERN = (r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,3}0{0,3})?)?"
               r"(Z|z|[+-](0\d|1[0-3]):[0-5]\d|[+-]14:00)$")


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, code="INVALID_TIMESTAMP", details={"field": field})


def parse_time(value: Any, field: str) -> int:
    """An ISO 8601 timestamp with an offset, as ms since the epoch (whole ms only)."""
    if not isinstance(value, str) or not _ISO_RE.match(value):
        raise _invalid(field, f"{field} must be an ISO 8601 timestamp with an offset "
                              "(e.g. 2030-01-01T09:00:00Z)")
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise _invalid(field, f"{field} is not a valid date-time") from None
    offset = moment.utcoffset()
    if offset is None:  # the regex already demands one
        raise _invalid(field, f"{field} needs a UTC offset")
    if abs(offset) > MAX_OFFSET:
        raise _invalid(field, f"{field} has a UTC offset beyond ±14:00")
    if moment.microsecond % 1000:
        raise _invalid(field, f"{field} is more precise than a millisecond")
    try:
        delta = moment - EPOCH
        ms = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    except (OverflowError, ValueError):  # an offset pushes it past year 1 or 9999
        raise _invalid(field, f"{field} is out of range") from None
    if not MIN_MS <= ms <= MAX_MS:
        raise _invalid(field, f"{field} is out of range")
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
        raise ValidationError(f"{end_field} must be after {start_field}",
                              code="INVALID_TIME_RANGE", details={"field": end_field})
    return start_ms, end_ms
