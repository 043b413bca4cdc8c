"""``slotguard availability …`` in real processes against the test's Postgres schema and Redis
prefix (issue 13): a schedule set from a file and shown back, blocks added, listed and
deleted, an ICS calendar imported, the slots shown; bad input exits 1 and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from tests.test_cli import CLI, cli_env, run  # noqa: F401  (fixture)

SCHEDULE = {"timeZone": "Europe/Berlin", "weekly": {"mon": [["09:00", "17:00"]]},
            "horizonDays": 365}
ICS = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:t\r\nBEGIN:VEVENT\r\nUID:a\r\n"
       "DTSTART:20270104T090000Z\r\nDTEND:20270104T100000Z\r\nRRULE:FREQ=WEEKLY;COUNT=3\r\n"
       "END:VEVENT\r\nEND:VCALENDAR\r\n")


def test_availability_cli(cli_env):  # noqa: F811
    workdir = tempfile.mkdtemp(prefix="sg-avail-cli-")
    try:
        run(cli_env, "migrate")
        run(cli_env, "vendors", "create", "--id", "cli-vendor", "--free")
        schedule_file = os.path.join(workdir, "schedule.json")
        with open(schedule_file, "w") as handle:
            json.dump(SCHEDULE, handle)
        saved = json.loads(run(cli_env, "availability", "schedule", "set", "cli-vendor",
                               schedule_file))
        assert saved["timeZone"] == "Europe/Berlin" and saved["weekly"]["tue"] == []
        shown = json.loads(run(cli_env, "availability", "schedule", "show", "cli-vendor"))
        assert shown == saved

        bad_file = os.path.join(workdir, "bad.json")
        with open(bad_file, "w") as handle:
            json.dump({"timeZone": "Nowhere/Land"}, handle)
        done = subprocess.run([*CLI, "availability", "schedule", "set", "cli-vendor",
                               bad_file], env=cli_env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 1 and "UNKNOWN_TIME_ZONE" in done.stderr
        assert json.loads(run(cli_env, "availability", "schedule", "show",
                              "cli-vendor")) == saved

        block = json.loads(run(cli_env, "availability", "blocks", "add", "cli-vendor",
                               "--start", "2027-01-11T08:00:00Z",
                               "--end", "2027-01-11T09:00:00Z"))
        assert block["blockId"].startswith("blk_") and block["status"] == "busy"
        ics_file = os.path.join(workdir, "cal.ics")
        with open(ics_file, "w") as handle:
            handle.write(ICS)
        imported = json.loads(run(cli_env, "availability", "calendar", "import",
                                  "cli-vendor", "work", ics_file))
        assert imported["blocks"] == 3 and imported["busy"] == 3
        blocks = json.loads(run(cli_env, "availability", "blocks", "list", "cli-vendor"))
        assert len(blocks) == 4
        slots = json.loads(run(cli_env, "availability", "show", "cli-vendor",
                               "--start", "2027-01-11T08:00:00Z",
                               "--end", "2027-01-11T10:00:00Z", "--slot-minutes", "60"))
        assert [s["reasons"] for s in slots["slots"]] == [["busy"], ["busy"]]
        run(cli_env, "availability", "blocks", "delete", "cli-vendor", block["blockId"])
        slots = json.loads(run(cli_env, "availability", "show", "cli-vendor",
                               "--start", "2027-01-11T08:00:00Z",
                               "--end", "2027-01-11T10:00:00Z", "--slot-minutes", "60"))
        assert [s["reasons"] for s in slots["slots"]] == [[], ["busy"]]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
