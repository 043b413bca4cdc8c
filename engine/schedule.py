"""A vendor's working hours (issue 13): validation and local hours in an IANA zone.

Pure (no I/O). ``parse_schedule`` turns the JSON object of ``PUT /v1/vendors/{id}/schedule``
into a :class:`Schedule` or raises a typed ValidationError naming the field; its
``document()`` is exactly what ``GET`` answers (the object PUT accepted, defaults filled).

Local times are wall-clock times of the vendor's zone (``zoneinfo``): a day of 23 or 25
hours keeps its local hours ("09:00"-"17:00" is 8 hours of wall clock either way). A local
time that does not exist (the hour skipped when clocks go forward) is read with the offset
before the change (``fold=0``), i.e. it lands one hour later in wall-clock terms; a time
that occurs twice (clocks go back) is its first occurrence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.errors import ValidationError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_INTERVALS_PER_DAY = 8
MAX_OVERRIDES = 400  # a little over a year of single-date exceptions
MAX_TOTAL_INTERVALS = 500  # weekly plus overrides: a schedule of 1,000 intervals is refused
LIMITS = {
    "slotDurationMinutes": (5, 1440),
    "minimumNoticeMinutes": (0, 43_200),
    "horizonDays": (1, 730),
    "bufferBeforeMinutes": (0, 1440),
    "bufferAfterMinutes": (0, 1440),
}
DEFAULTS: dict[str, Any] = {
    "slotDurationMinutes": 30,
    "minimumNoticeMinutes": 0,
    "horizonDays": 90,
    "bufferBeforeMinutes": 0,
    "bufferAfterMinutes": 0,
    "allowTentative": False,
}
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
MINUTE_MS = 60_000
DAY_MS = 86_400_000

Intervals = tuple[tuple[int, int], ...]  # local minutes from midnight, [start, end)


@dataclass(frozen=True, slots=True)
class Schedule:
    time_zone: str
    weekly: dict[str, Intervals]
    overrides: dict[str, Intervals]  # ISO date -> intervals (empty: closed)
    slot_duration_minutes: int
    minimum_notice_minutes: int
    horizon_days: int
    buffer_before_minutes: int
    buffer_after_minutes: int
    allow_tentative: bool
    raw: dict[str, Any]  # the accepted document, defaults filled (what GET answers)
    # Local date -> its working hours as UTC ms (computed once per date: zone arithmetic
    # is the expensive part of a placement check).
    _days: dict = field(default_factory=dict, compare=False, repr=False)

    def document(self) -> dict[str, Any]:
        return self.raw

    @property
    def zone(self) -> ZoneInfo:
        return zone(self.time_zone)

    def intervals_on(self, day: date) -> Intervals:
        override = self.overrides.get(day.isoformat())
        if override is not None:
            return override
        return self.weekly[WEEKDAYS[day.weekday()]]

    def open_intervals(self, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """The working hours overlapping ``[start_ms, end_ms)`` as merged UTC ms intervals."""
        return _open_intervals(self, start_ms, end_ms)


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def check_zone(name: Any, field: str = "timeZone") -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 64 or name.startswith("/") \
            or ".." in name or "\x00" in name:
        raise ValidationError("timeZone must be an IANA time zone name",
                              code="UNKNOWN_TIME_ZONE", details={"field": field})
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValidationError(f"unknown time zone {name!r}", code="UNKNOWN_TIME_ZONE",
                              details={"field": field, "timeZone": name}) from None
    return name


def _minutes(text: Any, field: str) -> int:
    if not isinstance(text, str) or not _TIME_RE.match(text):
        raise ValidationError("times are local HH:MM (00:00..24:00)", code="INVALID_TIME",
                              details={"field": field})
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _intervals(value: Any, field: str) -> Intervals:
    if not isinstance(value, list):
        raise ValidationError("intervals are a list of [start, end] pairs",
                              code="INVALID_INTERVALS", details={"field": field})
    if len(value) > MAX_INTERVALS_PER_DAY:
        raise ValidationError(f"at most {MAX_INTERVALS_PER_DAY} intervals a day",
                              code="TOO_MANY_INTERVALS",
                              details={"field": field, "maximum": MAX_INTERVALS_PER_DAY})
    out = []
    for i, pair in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValidationError("an interval is a [start, end] pair",
                                  code="INVALID_INTERVALS", details={"field": where})
        start, end = _minutes(pair[0], where), _minutes(pair[1], where)
        if end <= start:
            raise ValidationError("an interval must end after it starts",
                                  code="INVERTED_INTERVAL", details={"field": where})
        out.append((start, end))
    ordered = sorted(out)
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        if start < end:  # touching intervals are fine: half-open
            raise ValidationError("intervals of a day must not overlap",
                                  code="OVERLAPPING_INTERVALS", details={"field": field})
    return tuple(out)


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name, DEFAULTS[name])
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{name} must be an integer between {low} and {high}",
                              code="INVALID_FIELD",
                              details={"field": name, "minimum": low, "maximum": high})
    return value


def parse_schedule(doc: Any) -> Schedule:
    """Validate a schedule document (all of it, before anything is stored)."""
    if not isinstance(doc, dict):
        raise ValidationError("the schedule is a JSON object", code="INVALID_FIELD_TYPE")
    known = {"timeZone", "weekly", "overrides", *DEFAULTS}
    for name in doc:
        if name not in known:
            raise ValidationError(f"unknown field {name!r}", code="UNKNOWN_FIELD",
                                  details={"field": name})
    if "timeZone" not in doc:
        raise ValidationError("timeZone is required", code="MISSING_FIELD",
                              details={"field": "timeZone"})
    time_zone = check_zone(doc["timeZone"])
    weekly_doc = doc.get("weekly", {})
    if not isinstance(weekly_doc, dict):
        raise ValidationError("weekly maps mon..sun to intervals", code="INVALID_FIELD_TYPE",
                              details={"field": "weekly"})
    for day in weekly_doc:
        if day not in WEEKDAYS:
            raise ValidationError(f"unknown weekday {day!r}", code="UNKNOWN_FIELD",
                                  details={"field": f"weekly.{day}", "allowed": list(WEEKDAYS)})
    weekly = {day: _intervals(weekly_doc.get(day, []), f"weekly.{day}") for day in WEEKDAYS}
    overrides_doc = doc.get("overrides", [])
    if not isinstance(overrides_doc, list):
        raise ValidationError("overrides is a list", code="INVALID_FIELD_TYPE",
                              details={"field": "overrides"})
    if len(overrides_doc) > MAX_OVERRIDES:
        raise ValidationError(f"at most {MAX_OVERRIDES} overrides", code="TOO_MANY_OVERRIDES",
                              details={"field": "overrides", "maximum": MAX_OVERRIDES})
    overrides: dict[str, Intervals] = {}
    for i, item in enumerate(overrides_doc):
        where = f"overrides[{i}]"
        if not isinstance(item, dict) or set(item) - {"date", "intervals"} \
                or "date" not in item or "intervals" not in item:
            raise ValidationError("an override is {date, intervals}", code="INVALID_OVERRIDE",
                                  details={"field": where})
        day = item["date"]
        try:
            if not isinstance(day, str) or not _DATE_RE.match(day):
                raise ValueError
            date.fromisoformat(day)
        except ValueError:
            raise ValidationError("an override's date is YYYY-MM-DD", code="INVALID_DATE",
                                  details={"field": f"{where}.date"}) from None
        if day in overrides:
            raise ValidationError(f"two overrides for {day}", code="DUPLICATE_OVERRIDE",
                                  details={"field": f"{where}.date"})
        overrides[day] = _intervals(item["intervals"], f"{where}.intervals")
    total = sum(map(len, weekly.values())) + sum(map(len, overrides.values()))
    if total > MAX_TOTAL_INTERVALS:
        raise ValidationError(f"at most {MAX_TOTAL_INTERVALS} intervals in a schedule",
                              code="TOO_MANY_INTERVALS",
                              details={"field": "overrides", "maximum": MAX_TOTAL_INTERVALS})
    numbers = {name: _int(doc, name) for name in LIMITS}
    allow = doc.get("allowTentative", False)
    if not isinstance(allow, bool):
        raise ValidationError("allowTentative must be a boolean", code="INVALID_FIELD_TYPE",
                              details={"field": "allowTentative"})
    raw = {
        "timeZone": time_zone,
        "weekly": {day: [list(p) for p in weekly_doc.get(day, [])] for day in WEEKDAYS},
        "overrides": [{"date": o["date"], "intervals": [list(p) for p in o["intervals"]]}
                      for o in overrides_doc],
        **numbers,
        "allowTentative": allow,
    }
    return Schedule(time_zone=time_zone, weekly=weekly, overrides=overrides,
                    slot_duration_minutes=numbers["slotDurationMinutes"],
                    minimum_notice_minutes=numbers["minimumNoticeMinutes"],
                    horizon_days=numbers["horizonDays"],
                    buffer_before_minutes=numbers["bufferBeforeMinutes"],
                    buffer_after_minutes=numbers["bufferAfterMinutes"],
                    allow_tentative=allow, raw=raw)


def local_ms(day: date, minutes: int, tz: ZoneInfo) -> int:
    """The UTC instant (ms) of local wall-clock ``minutes`` after midnight of ``day``."""
    moment = datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(minutes=minutes)
    # Wall-clock arithmetic: timedelta on an aware datetime keeps the wall time, and the
    # offset is that of the resulting local time (fold=0).
    moment = moment.replace(tzinfo=None).replace(tzinfo=tz)
    return int(moment.astimezone(UTC).timestamp() * 1000)


MAX_CACHED_DAYS = 4096


def _day_intervals(schedule: Schedule, day: date) -> list[tuple[int, int]]:
    cached = schedule._days.get(day)
    if cached is None:
        tz = schedule.zone
        cached = [(local_ms(day, a, tz), local_ms(day, b, tz))
                  for a, b in sorted(schedule.intervals_on(day))]
        if len(schedule._days) >= MAX_CACHED_DAYS:
            schedule._days.clear()
        schedule._days[day] = cached
    return cached


def _open_intervals(schedule: Schedule, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    # Local dates from a day before to a day after: UTC offsets are under 24 hours.
    first = date.fromordinal(_EPOCH_ORDINAL + start_ms // DAY_MS - 1)
    last = date.fromordinal(_EPOCH_ORDINAL + end_ms // DAY_MS + 1)
    out: list[tuple[int, int]] = []
    day = first
    one = timedelta(days=1)
    while day <= last:
        for lo, hi in _day_intervals(schedule, day):
            if hi > start_ms and lo < end_ms and hi > lo:
                if out and lo <= out[-1][1]:
                    out[-1] = (out[-1][0], max(out[-1][1], hi))
                else:
                    out.append((lo, hi))
        day += one
    return out


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
