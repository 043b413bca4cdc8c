"""Request and response bodies of the availability engine (issue 13).

The Structs decode the JSON shape; the rules JSON Schema cannot state (a known IANA zone,
intervals that neither overlap nor invert, at most 8 a day, 500 in a schedule) are the
service's (engine/schedule.py), answered with their own 400 codes. Their documented shape
is stated with ``doc`` so the OpenAPI document says what the service accepts.
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET, UnsetType

from api.schemas import Body, Name, Out, OutTime, Time, doc, text
from engine.availability import REASONS
from engine.schedule import LIMITS, MAX_INTERVALS_PER_DAY, MAX_OVERRIDES, WEEKDAYS

LOCAL_TIME = {"type": "string", "pattern": "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"}
INTERVALS = {"type": "array", "maxItems": MAX_INTERVALS_PER_DAY,
             "items": {"type": "array", "prefixItems": [LOCAL_TIME, LOCAL_TIME],
                       "minItems": 2, "maxItems": 2},
             "description": "local [start, end) times, HH:MM (24:00 ends a day); "
                            "end after start, no two overlapping"}
WEEKLY_DOC = {"type": "object", "properties": {day: INTERVALS for day in WEEKDAYS},
              "additionalProperties": False,
              "description": "weekday -> working hours; a missing day is closed"}
OVERRIDES_DOC = {"type": "array", "maxItems": MAX_OVERRIDES,
                 "items": {"type": "object",
                           "properties": {"date": {"type": "string", "format": "date",
                                                   "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                          "intervals": INTERVALS},
                           "required": ["date", "intervals"], "additionalProperties": False},
                 "description": "a date's hours replace its weekday's; [] closes the day"}


def _limited(name: str, description: str = "") -> Any:
    low, high = LIMITS[name]
    return doc(int, minimum=low, maximum=high, **({"description": description}
                                                 if description else {}))


class ScheduleBody(Body):
    """A vendor's schedule: ``GET`` answers exactly what ``PUT`` accepted, defaults filled."""

    time_zone: text(64, {"description": "an IANA time zone name, e.g. Europe/Berlin"})
    weekly: doc(dict[str, Any], **WEEKLY_DOC) | UnsetType = UNSET
    overrides: doc(list[Any], **OVERRIDES_DOC) | UnsetType = UNSET
    slot_duration_minutes: _limited("slotDurationMinutes", "default 30") | UnsetType = UNSET
    minimum_notice_minutes: _limited("minimumNoticeMinutes", "default 0") | UnsetType = UNSET
    horizon_days: _limited("horizonDays", "default 90") | UnsetType = UNSET
    buffer_before_minutes: _limited("bufferBeforeMinutes", "free time required before a "
                                    "slot, up to a busy block; default 0") | UnsetType = UNSET
    buffer_after_minutes: _limited("bufferAfterMinutes", "free time required after a slot, "
                                   "up to a busy block; default 0") | UnsetType = UNSET
    allow_tentative: doc(bool, description="tentative blocks do not refuse slots; "
                         "default false") | UnsetType = UNSET


class Schedule(Out):
    time_zone: str
    weekly: doc(dict[str, Any], **WEEKLY_DOC)
    overrides: doc(list[Any], **OVERRIDES_DOC)
    slot_duration_minutes: int
    minimum_notice_minutes: int
    horizon_days: int
    buffer_before_minutes: int
    buffer_after_minutes: int
    allow_tentative: bool


class BusyBlockRequest(Body):
    start: Time
    end: Time
    status: text(16, {"enum": ["busy", "tentative"], "description": "default busy"}) \
        | UnsetType = UNSET
    source: text(64, {"description": "free text naming where the block comes from; "
                                     "default manual"}) | UnsetType = UNSET
    resource_id: Name | UnsetType = UNSET


class BusyBlock(Out):
    block_id: str
    vendor_id: str
    start: OutTime
    end: OutTime
    status: doc(str, enum=["busy", "tentative"])
    source: str
    resource_id: str | None
    calendar_id: str | None


class BusyBlockList(Out):
    blocks: list[BusyBlock]


class DeletedBusyBlock(Out):
    block_id: str
    deleted: bool


class CalendarImport(Out):
    vendor_id: str
    calendar_id: str
    blocks: int
    busy: int
    tentative: int
    removed: int
    expanded_until: OutTime


class RuleApplied(Out):
    rule: doc(str, enum=list(REASONS))
    refused: bool
    detail: dict[str, Any] | None


AVAILABILITY_REQUESTS = (ScheduleBody, BusyBlockRequest)
AVAILABILITY_RESPONSES = (Schedule, BusyBlock, BusyBlockList, DeletedBusyBlock,
                          CalendarImport, RuleApplied)
