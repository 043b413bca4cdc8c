-- Events out (issue 14): webhook endpoints, the event outbox, deliveries.
-- depends: 0006_reservation_blocks

-- Who receives what. owner_kind/owner_id is the tenancy: a partner's endpoints get its
-- reservations' events, a vendor's its vendor's, 'ops' endpoints (owner_id '') every event
-- including the ops-only hold.* events.
CREATE TABLE webhook_endpoints (
    id                          text PRIMARY KEY,
    owner_kind                  text NOT NULL CHECK (owner_kind IN ('partner', 'vendor', 'ops')),
    owner_id                    text NOT NULL,
    url                         text NOT NULL,
    events                      text[] NOT NULL,
    description                 text NOT NULL DEFAULT '',
    secret                      text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    disabled                    boolean NOT NULL DEFAULT false,
    disabled_reason             text,
    failing_since               timestamptz,     -- first failed attempt of the current run
    flagged_at                  timestamptz,     -- a delivery went dead
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_owner_idx ON webhook_endpoints (owner_kind, owner_id);

-- The outbox: one row per event, written in the commit-queue transaction that records the
-- transition (or by the ops service for a bulk release). position orders the live stream
-- (SSE ids); writers take an advisory lock before inserting, so positions become visible in
-- order.
CREATE TABLE webhook_events (
    position        bigserial PRIMARY KEY,
    event_key       text NOT NULL UNIQUE,          -- '<event id>:<type>' (idempotent writes)
    type            text NOT NULL,
    audience        text NOT NULL CHECK (audience IN ('tenants', 'ops', 'endpoint')),
    partner_id      text,
    vendor_id       text,
    reservation_id  text,
    version         int,
    payload         jsonb NOT NULL,                -- {"type", "timestamp", "data"}
    occurred_at     timestamptz NOT NULL,          -- the transition's time
    emitted_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhook_events_partner_idx ON webhook_events (partner_id, position);
CREATE INDEX webhook_events_vendor_idx ON webhook_events (vendor_id, position);

-- One row per (endpoint, event): its webhook-id stays the same across retries.
CREATE TABLE webhook_deliveries (
    id                text PRIMARY KEY,
    endpoint_id       text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_position    bigint NOT NULL REFERENCES webhook_events (position),
    webhook_id        text NOT NULL,
    type              text NOT NULL,
    reservation_id    text,
    version           int,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'delivered', 'failed', 'dead')),
    attempts          int NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    leased_until      timestamptz,
    last_status_code  int,
    last_latency_ms   int,
    last_error        text,
    last_attempt_at   timestamptz,
    delivered_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (endpoint_id, event_position)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, reservation_id, version)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log_idx ON webhook_deliveries (endpoint_id, event_position DESC);
