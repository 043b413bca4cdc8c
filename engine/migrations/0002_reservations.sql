-- The reservation record once Redis has moved on: a latest snapshot per reservation, and
-- every transition (one row per stream event, keyed by the event id so redelivery is a no-op).
-- depends: 0001_directory

CREATE TABLE reservations (
    id              text PRIMARY KEY,
    partner_id      text NOT NULL,
    vendor_id       text NOT NULL,
    resource_id     text NOT NULL,
    requester_id    text NOT NULL,
    slot_start      timestamptz NOT NULL,
    slot_end        timestamptz NOT NULL,
    state           text NOT NULL CHECK (state IN (
                        'INTENT_CREATED', 'HELD', 'AWAITING_VENDOR_CONFIRMATION',
                        'CONFIRMED_BY_VENDOR', 'AWAITING_VENDOR_AUTH', 'VENDOR_AUTHORIZED',
                        'AWAITING_REQUESTER_AUTH', 'AUTHORIZED_BOTH', 'COMMIT_IN_PROGRESS',
                        'COMMITTED', 'FAILED_VENDOR_TIMEOUT', 'FAILED_VENDOR_AUTH',
                        'FAILED_REQUESTER_AUTH', 'FAILED_AVAILABILITY_CHANGED', 'FAILED_COMMIT',
                        'EXPIRED', 'CANCELLED')),
    version         integer NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    booking_id      text,
    failure_reason  text,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX reservations_partner_idx ON reservations (partner_id, created_at);
CREATE INDEX reservations_resource_idx ON reservations (resource_id, slot_start);

CREATE TABLE reservation_history (
    event_id         text PRIMARY KEY,
    reservation_id   text NOT NULL,
    from_state       text,
    to_state         text NOT NULL,
    triggered_by     text NOT NULL,
    reason           text,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key  text,
    version          integer NOT NULL,
    at               timestamptz NOT NULL
);
CREATE INDEX reservation_history_reservation_idx ON reservation_history (reservation_id, version);
