"""The availability computation (engine/availability.py, engine/schedule.py, engine/ics.py):
pure functions, so these tests need no server. DST weeks in two zones, a 30-minute offset
zone, overrides, notice and horizon edges, the past, ICS recurrence, and a Hypothesis
property: a slot is available iff no rule refuses it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import availability as av
from engine.availability import Block, Rules
from engine.errors import ValidationError
from engine.ics import expand
from engine.schedule import parse_schedule

H = 3_600_000
M = 60_000
DAY = 86_400_000
WEEK = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def schedule(zone: str, hours=(("09:00", "17:00"),), **extra):
    return parse_schedule({"timeZone": zone,
                           "weekly": {d: [list(h) for h in hours] for d in WEEK}, **extra})


def rules(sched=None, blocks=()):
    return Rules("v1", 1, sched, tuple(sorted(blocks, key=lambda b: b.start_ms)))


def open_hours(sched, start: str, end: str):
    return [(datetime.fromtimestamp(a / 1000, UTC).isoformat(),
             datetime.fromtimestamp(b / 1000, UTC).isoformat())
            for a, b in sched.open_intervals(ms(start), ms(end))]


# ---- DST: a day of 23 or 25 hours keeps its local hours ------------------------------------
def test_berlin_spring_forward_week_keeps_local_hours():
    sched = schedule("Europe/Berlin")
    # 2026-03-29 is the day Berlin goes from +01:00 to +02:00.
    hours = open_hours(sched, "2026-03-28T00:00:00+00:00", "2026-03-31T00:00:00+00:00")
    assert ("2026-03-28T08:00:00+00:00", "2026-03-28T16:00:00+00:00") in hours  # CET
    assert ("2026-03-29T07:00:00+00:00", "2026-03-29T15:00:00+00:00") in hours  # CEST
    assert ("2026-03-30T07:00:00+00:00", "2026-03-30T15:00:00+00:00") in hours


def test_berlin_fall_back_day_has_25_hours_and_the_same_local_hours():
    sched = schedule("Europe/Berlin", hours=(("00:00", "24:00"),))
    # 2026-10-25: clocks go back; the local day lasts 25 hours.
    hours = open_hours(sched, "2026-10-24T22:00:00+00:00", "2026-10-25T23:00:00+00:00")
    assert hours == [("2026-10-24T22:00:00+00:00", "2026-10-25T23:00:00+00:00")]
    day = sched.open_intervals(ms("2026-10-24T22:00:00+00:00"),
                               ms("2026-10-25T23:00:00+00:00"))
    assert day[0][1] - day[0][0] == 25 * H


def test_new_york_dst_weeks():
    sched = schedule("America/New_York")
    # 2026-03-08 (spring forward) and 2026-11-01 (fall back).
    spring = open_hours(sched, "2026-03-07T00:00:00+00:00", "2026-03-09T00:00:00+00:00")
    assert ("2026-03-07T14:00:00+00:00", "2026-03-07T22:00:00+00:00") in spring  # EST
    assert ("2026-03-08T13:00:00+00:00", "2026-03-08T21:00:00+00:00") in spring  # EDT
    fall = open_hours(sched, "2026-10-31T00:00:00+00:00", "2026-11-03T00:00:00+00:00")
    assert ("2026-10-31T13:00:00+00:00", "2026-10-31T21:00:00+00:00") in fall  # EDT
    assert ("2026-11-02T14:00:00+00:00", "2026-11-02T22:00:00+00:00") in fall  # EST


def test_half_hour_offset_zones():
    kolkata = open_hours(schedule("Asia/Kolkata"), "2026-12-01T00:00:00+00:00",
                         "2026-12-01T23:00:00+00:00")
    assert kolkata == [("2026-12-01T03:30:00+00:00", "2026-12-01T11:30:00+00:00")]
    # Adelaide: +10:30 in (southern) summer.
    adelaide = open_hours(schedule("Australia/Adelaide"), "2026-12-01T00:00:00+00:00",
                          "2026-12-01T12:00:00+00:00")
    assert ("2026-11-30T22:30:00+00:00", "2026-12-01T06:30:00+00:00") in adelaide


def test_overrides_replace_a_day_and_an_empty_one_closes_it():
    sched = schedule("UTC", overrides=[{"date": "2026-12-24", "intervals": []},
                                       {"date": "2026-12-23", "intervals": [["10:00", "12:00"]]}])
    hours = open_hours(sched, "2026-12-23T00:00:00+00:00", "2026-12-25T23:00:00+00:00")
    assert hours == [("2026-12-23T10:00:00+00:00", "2026-12-23T12:00:00+00:00"),
                     ("2026-12-25T09:00:00+00:00", "2026-12-25T17:00:00+00:00")]
    r = rules(sched)
    now = ms("2026-12-01T00:00:00+00:00")
    assert av.refusals(r, "v1", ms("2026-12-24T10:00:00+00:00"),
                       ms("2026-12-24T10:30:00+00:00"), now) == ["outside_hours"]


def test_get_answers_exactly_what_put_accepted_with_defaults():
    doc = {"timeZone": "Europe/Berlin", "weekly": {"mon": [["09:00", "12:00"],
                                                           ["13:00", "17:00"]]},
           "overrides": [{"date": "2026-12-24", "intervals": []}], "horizonDays": 30}
    out = parse_schedule(doc).document()
    assert out == {"timeZone": "Europe/Berlin",
                   "weekly": {"mon": [["09:00", "12:00"], ["13:00", "17:00"]], "tue": [],
                              "wed": [], "thu": [], "fri": [], "sat": [], "sun": []},
                   "overrides": [{"date": "2026-12-24", "intervals": []}],
                   "slotDurationMinutes": 30, "minimumNoticeMinutes": 0, "horizonDays": 30,
                   "bufferBeforeMinutes": 0, "bufferAfterMinutes": 0, "allowTentative": False}
    assert parse_schedule(out).document() == out  # a GET body PUT back is the same


@pytest.mark.parametrize("doc, code", [
    ({"timeZone": "Mars/Olympus"}, "UNKNOWN_TIME_ZONE"),
    ({"timeZone": "../etc/passwd"}, "UNKNOWN_TIME_ZONE"),
    ({"timeZone": "UTC", "weekly": {"mon": [["09:00", "12:00"], ["11:00", "13:00"]]}},
     "OVERLAPPING_INTERVALS"),
    ({"timeZone": "UTC", "weekly": {"mon": [["12:00", "09:00"]]}}, "INVERTED_INTERVAL"),
    ({"timeZone": "UTC", "weekly": {"mon": [[f"{h:02}:00", f"{h:02}:30"] for h in range(9)]}},
     "TOO_MANY_INTERVALS"),
    ({"timeZone": "UTC", "weekly": {"mon": [["25:00", "26:00"]]}}, "INVALID_TIME"),
    ({"timeZone": "UTC", "weekly": {"funday": []}}, "UNKNOWN_FIELD"),
    ({"timeZone": "UTC", "horizonDays": 0}, "INVALID_FIELD"),
    ({"timeZone": "UTC", "horizonDays": 731}, "INVALID_FIELD"),
    ({"timeZone": "UTC", "minimumNoticeMinutes": 43_201}, "INVALID_FIELD"),
    ({"timeZone": "UTC", "slotDurationMinutes": 4}, "INVALID_FIELD"),
    ({"timeZone": "UTC", "slotDurationMinutes": 1441}, "INVALID_FIELD"),
    ({"timeZone": "UTC", "overrides": [{"date": "2026-02-30", "intervals": []}]},
     "INVALID_DATE"),
    ({"timeZone": "UTC", "overrides": [{"date": "2026-12-24", "intervals": []},
                                       {"date": "2026-12-24", "intervals": []}]},
     "DUPLICATE_OVERRIDE"),
    # 1,000 intervals: 125 override days of 8 each.
    ({"timeZone": "UTC", "overrides": [
        {"date": f"2027-{1 + d // 28:02}-{1 + d % 28:02}",
         "intervals": [[f"{h:02}:00", f"{h:02}:30"] for h in range(8)]} for d in range(125)]},
     "TOO_MANY_INTERVALS"),
])
def test_bad_schedules_are_typed_errors(doc, code):
    with pytest.raises(ValidationError) as caught:
        parse_schedule(doc)
    assert caught.value.code == code


# ---- the time rules ------------------------------------------------------------------------
def test_past_notice_and_horizon_edges():
    sched = schedule("UTC", hours=(("00:00", "24:00"),), minimumNoticeMinutes=60,
                     horizonDays=2)
    r = rules(sched)
    now = ms("2026-12-01T10:00:00+00:00")
    at = lambda minutes: now + minutes * M  # noqa: E731
    assert av.refusals(r, "v1", at(-30), at(0), now) == ["in_past"]
    assert av.refusals(r, "v1", at(0), at(30), now) == ["minimum_notice"]  # now: notice
    assert av.refusals(r, "v1", at(59), at(89), now) == ["minimum_notice"]
    assert av.refusals(r, "v1", at(60), at(90), now) == []  # exactly the notice: allowed
    end = 2 * 24 * 60
    assert av.refusals(r, "v1", at(end - 30), at(end), now) == []  # ends on the horizon
    assert av.refusals(r, "v1", at(end - 15), at(end + 15), now) == ["beyond_horizon"]


def test_a_vendor_without_schedule_is_always_open_but_not_in_the_past():
    r = rules()
    now = ms("2026-12-01T10:00:00+00:00")
    assert av.refusals(r, "v1", now + 3 * 365 * DAY, now + 3 * 365 * DAY + H, now) == []
    assert av.refusals(r, "v1", now - H, now, now) == ["in_past"]


def test_busy_tentative_buffer_and_resource_blocks():
    sched = schedule("UTC", hours=(("00:00", "24:00"),), bufferBeforeMinutes=15,
                     bufferAfterMinutes=15)
    t = ms("2026-12-02T10:00:00+00:00")
    blocks = [Block("b1", t, t + H, "busy"), Block("b2", t + 3 * H, t + 4 * H, "tentative"),
              Block("b3", t + 6 * H, t + 7 * H, "busy", resource_id="room2")]
    r = rules(sched, blocks)
    now = t - DAY
    assert av.refusals(r, "v1", t, t + 30 * M, now) == ["busy"]
    assert av.refusals(r, "v1", t + H, t + H + 30 * M, now) == ["buffer"]  # right after
    assert av.refusals(r, "v1", t + H + 15 * M, t + H + 45 * M, now) == []
    assert av.refusals(r, "v1", t + 3 * H, t + 3 * H + 30 * M, now) == ["tentative"]
    assert av.refusals(r, "v1", t + 6 * H, t + 7 * H, now) == []  # another resource's
    assert av.refusals(r, "room2", t + 6 * H, t + 7 * H, now) == ["busy"]
    allowing = rules(schedule("UTC", hours=(("00:00", "24:00"),), allowTentative=True), blocks)
    assert av.refusals(allowing, "v1", t + 3 * H, t + 3 * H + 30 * M, now) == []


def test_confidence_table_and_explain():
    sched = schedule("UTC", minimumNoticeMinutes=120, bufferAfterMinutes=30)
    now = ms("2026-12-02T08:00:00+00:00")
    t = ms("2026-12-02T12:00:00+00:00")
    r = rules(sched, [Block("b1", t, t + H, "busy"),
                      Block("b2", t + 2 * H, t + 3 * H, "tentative")])
    slots = av.compute(r, "v1", unit_ms=15 * M, buffer_before_ms=0, buffer_after_ms=0,
                       start_ms=now, end_ms=now + 12 * H, slot_ms=30 * M, now_ms=now,
                       occupancy="." * 48, first_unit=now // (15 * M))
    by_start = {s.start_ms: s for s in slots}
    # 08:00 is before the 09:00 opening and inside the notice: the lowest of 0.4 and 0.6.
    assert by_start[now].reasons == ["outside_hours", "minimum_notice"]
    assert by_start[now].confidence == 0.4
    assert by_start[t].reasons == ["busy"] and by_start[t].confidence == 0.0
    assert by_start[t - 30 * M].reasons == ["buffer"] and by_start[t - 30 * M].confidence == 0.8
    assert by_start[t + 2 * H].reasons == ["tentative"]
    assert by_start[t + 2 * H].confidence == 0.2
    assert by_start[now + 12 * H - 30 * M].reasons == ["outside_hours"]
    assert by_start[now + 12 * H - 30 * M].confidence == 0.4
    free = by_start[t + 4 * H]
    assert free.is_available and free.reasons == [] and free.confidence == 1.0
    steps = av.explain(r, "v1", t, t + 30 * M, now)
    assert [s["rule"] for s in steps] == ["in_past", "minimum_notice", "beyond_horizon",
                                          "outside_hours", "busy", "tentative", "buffer"]
    assert [s["rule"] for s in steps if s["refused"]] == ["busy"]


def test_the_same_inputs_give_the_same_version():
    sched = schedule("Europe/Berlin")
    now = ms("2026-12-01T08:00:00+00:00")
    start, end = ms("2026-12-02T00:00:00+00:00"), ms("2026-12-09T00:00:00+00:00")

    def run(blocks, occupancy):
        r = rules(sched, blocks)
        slots = av.compute(r, "v1", unit_ms=15 * M, buffer_before_ms=0, buffer_after_ms=0,
                           start_ms=start, end_ms=end, slot_ms=15 * M, now_ms=now,
                           occupancy=occupancy, first_unit=start // (15 * M))
        return slots, av.version(r, ["v1"], start, end, 15 * M, [occupancy], slots)

    units = (end - start) // (15 * M)
    a = run([Block("b1", start + 10 * H, start + 11 * H)], "." * units)
    assert a == run([Block("b1", start + 10 * H, start + 11 * H)], "." * units)
    assert a[1] != run([Block("b1", start + 10 * H, start + 12 * H)], "." * units)[1]
    assert a[1] != run([Block("b1", start + 10 * H, start + 11 * H)],
                       "h" + "." * (units - 1))[1]


# ---- property: available iff no rule refuses ------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    hours=st.lists(st.tuples(st.integers(0, 23), st.integers(1, 8)), max_size=3),
    notice=st.integers(0, 600), horizon=st.integers(1, 30),
    blocks=st.lists(st.tuples(st.integers(0, 7 * 96), st.integers(1, 16),
                              st.sampled_from(["busy", "tentative"])), max_size=6),
    held=st.sets(st.integers(0, 7 * 96 - 1), max_size=20),
    now_units=st.integers(-96, 3 * 96), allow=st.booleans(),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]),
    buffers=st.tuples(st.sampled_from([0, 15, 30]), st.sampled_from([0, 15, 45])),
    slot_units=st.sampled_from([1, 2, 3]),
)
def test_a_slot_is_available_iff_no_rule_refuses_it(hours, notice, horizon, blocks, held,
                                                    now_units, allow, zone, buffers,
                                                    slot_units):
    unit = 15 * M
    start = ms("2027-03-25T00:00:00+00:00")  # a week across Berlin's spring DST change
    intervals = []
    for h, length in sorted(hours):
        end_h = min(24, h + length)
        if intervals and h * 60 < intervals[-1][1]:
            continue
        intervals.append((h * 60, end_h * 60))
    doc_hours = [[f"{a // 60:02}:00", "24:00" if b == 1440 else f"{b // 60:02}:00"]
                 for a, b in intervals]
    sched = parse_schedule({"timeZone": zone, "weekly": {d: doc_hours for d in WEEK},
                            "minimumNoticeMinutes": notice, "horizonDays": horizon,
                            "allowTentative": allow, "bufferBeforeMinutes": buffers[0],
                            "bufferAfterMinutes": buffers[1]})
    r = rules(sched, [Block(f"b{i}", start + s * unit, start + (s + n) * unit, status)
                      for i, (s, n, status) in enumerate(blocks)])
    now = start + now_units * unit
    units = 7 * 96
    occupancy = "".join("h" if i in held else "." for i in range(units))
    slots = av.compute(r, "v1", unit_ms=unit, buffer_before_ms=0, buffer_after_ms=0,
                       start_ms=start, end_ms=start + units * unit,
                       slot_ms=slot_units * unit, now_ms=now, occupancy=occupancy,
                       first_unit=start // unit)
    assert len(slots) == units // slot_units
    for slot in slots:
        refused = av.refusals(r, "v1", slot.start_ms, slot.end_ms, now)
        i = (slot.start_ms - start) // unit
        taken = any(i + k in held for k in range(slot_units))
        assert slot.is_available == (not refused and not taken)
        assert set(slot.reasons) == set(refused) | ({"held"} if taken else set())
        assert set(slot.reasons) <= set(av.REASONS)
        assert slot.confidence == av.confidence_of(slot.reasons) or (
            slot.is_available and slot.confidence == 0.2)


# ---- ICS -----------------------------------------------------------------------------------
ICS = b"""BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//slotguard tests//EN
BEGIN:VEVENT
UID:weekly-standup
DTSTART;TZID=Europe/Berlin:20261130T100000
DTEND;TZID=Europe/Berlin:20261130T110000
RRULE:FREQ=WEEKLY;COUNT=10
EXDATE;TZID=Europe/Berlin:20261207T100000
END:VEVENT
BEGIN:VEVENT
UID:weekly-standup
RECURRENCE-ID;TZID=Europe/Berlin:20261214T100000
DTSTART;TZID=Europe/Berlin:20261214T150000
DTEND;TZID=Europe/Berlin:20261214T160000
END:VEVENT
BEGIN:VEVENT
UID:holiday
DTSTART;VALUE=DATE:20261225
DTEND;VALUE=DATE:20261226
END:VEVENT
BEGIN:VEVENT
UID:free-time
DTSTART:20261201T090000Z
DTEND:20261201T100000Z
TRANSP:TRANSPARENT
END:VEVENT
BEGIN:VEVENT
UID:cancelled
DTSTART:20261202T090000Z
DTEND:20261202T100000Z
STATUS:CANCELLED
END:VEVENT
BEGIN:VEVENT
UID:maybe
DTSTART:20261203T090000Z
DTEND:20261203T100000Z
STATUS:TENTATIVE
END:VEVENT
END:VCALENDAR
"""


def test_ics_expands_rrule_exdate_recurrence_id_and_ignores_free_and_cancelled():
    busy = expand(ICS, ms("2026-11-29T00:00:00+00:00"), ms("2027-01-01T00:00:00+00:00"),
                  max_events=100, time_zone="Europe/Berlin")
    got = [(datetime.fromtimestamp(b.start_ms / 1000, UTC).isoformat(), b.status, b.uid)
           for b in busy]
    standups = [g[0] for g in got if g[2] == "weekly-standup"]
    assert "2026-11-30T09:00:00+00:00" in standups  # 10:00 CET
    assert "2026-12-07T09:00:00+00:00" not in standups  # EXDATE
    assert "2026-12-14T14:00:00+00:00" in standups  # RECURRENCE-ID moved it to 15:00
    assert "2026-12-14T09:00:00+00:00" not in standups
    assert "2026-12-21T09:00:00+00:00" in standups
    assert ("2026-12-24T23:00:00+00:00", "busy", "holiday") in got  # Berlin's midnight
    assert all(g[2] not in ("free-time", "cancelled") for g in got)
    assert ("2026-12-03T09:00:00+00:00", "tentative", "maybe") in got


def test_ics_is_expanded_over_the_window_only():
    busy = expand(ICS, ms("2026-11-29T00:00:00+00:00"), ms("2026-12-10T00:00:00+00:00"),
                  max_events=100, time_zone="Europe/Berlin")
    assert [b.uid for b in busy].count("weekly-standup") == 1  # 11-30; 12-07 excluded
    assert all(b.start_ms < ms("2026-12-10T00:00:00+00:00") for b in busy)


BROKEN_ICS = [
    b"", b"hello", b"BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:x\n", b"\xff\xfe",
    b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:notadate\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
    b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:20261201T100000Z\r\nRRULE:FREQ=SOMETIMES\r\n"
    b"END:VEVENT\r\nEND:VCALENDAR\r\n",
]


@pytest.mark.parametrize("body", BROKEN_ICS)
def test_unparsable_ics_is_a_typed_error(body):
    with pytest.raises(ValidationError) as caught:
        expand(body, 0, DAY, max_events=10)
    assert caught.value.code == "INVALID_CALENDAR"
