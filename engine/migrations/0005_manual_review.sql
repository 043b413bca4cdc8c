-- Work for a human: inconsistencies reconciliation cannot settle alone, and stream entries
-- that failed too often to retry (dead letters), kept durably outside Redis.
-- depends: 0004_audit_log

CREATE TABLE manual_review (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL,
    reservation_id  text,
    resource_id     text,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz
);
-- One open case per kind and reservation: re-reporting the same problem is a no-op.
CREATE UNIQUE INDEX manual_review_open_idx ON manual_review (kind, reservation_id)
    WHERE resolved_at IS NULL;

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    stream      text NOT NULL,
    entry_id    text NOT NULL,
    fields      jsonb NOT NULL,
    error       text NOT NULL,
    deliveries  integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, entry_id)
);
