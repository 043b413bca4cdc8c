-- Availability inputs (issue 13): a vendor's weekly schedule, its busy blocks (manual or
-- imported from an ICS calendar) and one revision number per vendor that every change of
-- those inputs increments in the same transaction. The revision is what API processes
-- compare (through Redis, see engine/availability_rules.py) to know their cached rules are
-- current.
-- depends: 0006_reservation_blocks

CREATE TABLE vendor_schedules (
    vendor_id   text PRIMARY KEY REFERENCES vendors (id),
    schedule    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE busy_blocks (
    id           text PRIMARY KEY,
    vendor_id    text NOT NULL REFERENCES vendors (id),
    resource_id  text REFERENCES resources (id),
    start_at     timestamptz NOT NULL,
    end_at       timestamptz NOT NULL,
    status       text NOT NULL CHECK (status IN ('busy', 'tentative')),
    source       text NOT NULL DEFAULT 'manual',
    calendar_id  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (end_at > start_at)
);
CREATE INDEX busy_blocks_vendor_idx ON busy_blocks (vendor_id, start_at);
CREATE INDEX busy_blocks_calendar_idx ON busy_blocks (vendor_id, calendar_id);

CREATE TABLE availability_revisions (
    vendor_id  text PRIMARY KEY REFERENCES vendors (id),
    revision   bigint NOT NULL DEFAULT 0
);
