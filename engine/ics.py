"""ICS calendars as busy blocks (issue 13), with ``icalendar`` + ``recurring-ical-events``.

Recurring events (RRULE, RDATE, EXDATE, RECURRENCE-ID overrides) are expanded by
recurring-ical-events over the window asked for (the booking horizon) only. Events marked
``TRANSP:TRANSPARENT`` (free time) or ``STATUS:CANCELLED`` are ignored; ``STATUS:TENTATIVE``
becomes a tentative block, anything else a busy one. All-day events (DATE values) and
floating times (no zone) are read in the vendor's zone. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from engine.errors import ValidationError


@dataclass(frozen=True, slots=True)
class Busy:
    start_ms: int
    end_ms: int
    status: str  # busy | tentative
    uid: str


def _invalid(message: str) -> ValidationError:
    return ValidationError(message, code="INVALID_CALENDAR", details={"field": "body"})


def _ms(value, tz: ZoneInfo) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # floating time: the vendor's wall clock
            value = value.replace(tzinfo=tz)
        return int(value.astimezone(UTC).timestamp() * 1000)
    if isinstance(value, date):  # all day: the vendor's local midnight
        return int(datetime(value.year, value.month, value.day, tzinfo=tz)
                   .astimezone(UTC).timestamp() * 1000)
    raise _invalid("an event has a start or end that is not a date or date-time")


def expand(body: bytes, start_ms: int, end_ms: int, *, max_events: int,
           time_zone: str = "UTC") -> list[Busy]:
    """Busy and tentative intervals of ``body`` overlapping ``[start_ms, end_ms)``; an
    unparsable calendar (or one of more than ``max_events`` occurrences) is refused."""
    import icalendar
    import recurring_ical_events

    tz = ZoneInfo(time_zone)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("the calendar is not UTF-8 text") from None
    if "BEGIN:VCALENDAR" not in text.upper():
        raise _invalid("the body is not an iCalendar (no BEGIN:VCALENDAR)")
    try:
        calendar = icalendar.Calendar.from_ical(text)
    except Exception as exc:  # icalendar raises ValueError and friends on any bad line
        raise _invalid(f"the calendar cannot be parsed: {exc}"[:200]) from None
    if getattr(calendar, "name", "") != "VCALENDAR":
        raise _invalid("the body is not a VCALENDAR")
    window = (datetime.fromtimestamp(start_ms / 1000, UTC),
              datetime.fromtimestamp(end_ms / 1000, UTC))
    out: list[Busy] = []
    try:
        occurrences = recurring_ical_events.of(calendar).between(*window)
        for event in occurrences:
            status = str(event.get("STATUS", "CONFIRMED")).upper()
            transparency = str(event.get("TRANSP", "OPAQUE")).upper()
            if status == "CANCELLED" or transparency == "TRANSPARENT":
                continue
            if "DTSTART" not in event:
                continue
            begin = event.decoded("DTSTART")
            if "DTEND" in event:
                finish = event.decoded("DTEND")
            elif "DURATION" in event:
                finish = begin + event.decoded("DURATION")
            elif isinstance(begin, datetime):
                finish = begin  # an instant blocks nothing
            else:
                finish = begin + timedelta(days=1)
            lo, hi = _ms(begin, tz), _ms(finish, tz)
            if hi <= lo or hi <= start_ms or lo >= end_ms:
                continue
            out.append(Busy(lo, hi, "tentative" if status == "TENTATIVE" else "busy",
                            str(event.get("UID", ""))))
            if len(out) > max_events:
                raise ValidationError("the calendar expands to too many events",
                                      code="TOO_MANY_BUSY_BLOCKS",
                                      details={"maximum": max_events})
    except ValidationError:
        raise
    except Exception as exc:  # a bad RRULE, an unknown TZID, ...
        raise _invalid(f"the calendar cannot be expanded: {exc}"[:200]) from None
    out.sort(key=lambda b: (b.start_ms, b.end_ms, b.uid))
    return out
