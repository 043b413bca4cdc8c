-- Payments (issue 12): a vendor's payment terms, the PaymentIntents of each reservation and
-- every call made on them, Stripe events applied, and booking cancellations.
-- depends: 0006_reservation_blocks

-- Amounts are minor units (cents). A vendor is free unless payment_required (the default
-- everywhere: CLI, admin API, docs).
ALTER TABLE vendors
    ADD COLUMN price_amount bigint CHECK (price_amount > 0),
    ADD COLUMN deposit_amount bigint CHECK (deposit_amount > 0),
    ADD COLUMN currency text,
    ADD COLUMN stripe_account_id text,
    ADD COLUMN refund_policy text NOT NULL DEFAULT 'full'
        CHECK (refund_policy IN ('full', 'none', 'full_before')),
    ADD COLUMN refund_cutoff_minutes integer CHECK (refund_cutoff_minutes >= 0);

-- One row per PaymentIntent we created (or are about to create): the row is written BEFORE
-- the call, so a crash between the call and its answer is found (and the intent looked up
-- by its metadata) instead of authorizing twice. role: vendor (the deposit, a platform
-- charge) or requester (the price, on the vendor's connected account when it has one).
CREATE TABLE payment_intents (
    reservation_id      text NOT NULL,
    role                text NOT NULL CHECK (role IN ('vendor', 'requester')),
    attempt             integer NOT NULL CHECK (attempt > 0),
    idempotency_key     text NOT NULL UNIQUE,
    partner_id          text NOT NULL,
    vendor_id           text NOT NULL,
    amount              bigint NOT NULL CHECK (amount > 0),
    currency            text NOT NULL,
    stripe_account_id   text,
    payment_method_id   text NOT NULL,
    intent_id           text UNIQUE,
    -- calling | requires_action | requires_capture | capturing | succeeded | canceled |
    -- failed (declined or unusable; no money held)
    status              text NOT NULL DEFAULT 'calling',
    next_action         jsonb,
    authorized_at       timestamptz,
    capture_attempts    integer NOT NULL DEFAULT 0,
    captured_at         timestamptz,
    capture_id          text,
    canceled_at         timestamptz,
    refunded_amount     bigint NOT NULL DEFAULT 0,
    refund_id           text,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reservation_id, role, attempt)
);
-- At most one live intent per reservation and role: two concurrent authorizations cannot
-- both hold money.
CREATE UNIQUE INDEX payment_intents_live_idx ON payment_intents (reservation_id, role)
    WHERE status NOT IN ('failed', 'canceled');
CREATE INDEX payment_intents_open_idx ON payment_intents (status, created_at)
    WHERE status IN ('calling', 'requires_action', 'requires_capture', 'capturing');

-- Every call to the provider, recorded before it is made and completed after: what the
-- idempotency keys were, what came back. A call with no finished_at was interrupted.
CREATE TABLE payment_calls (
    id                bigserial PRIMARY KEY,
    reservation_id    text NOT NULL,
    role              text NOT NULL,
    operation         text NOT NULL,  -- auth | capture | cancel | refund | retrieve
    idempotency_key   text NOT NULL,
    intent_id         text,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    outcome           text,
    error             text
);
CREATE INDEX payment_calls_reservation_idx ON payment_calls (reservation_id, id);

-- The commit's payment decision per reservation: 'captured' (both captured; the booking
-- may be written) or 'failed' (compensation: nothing may be captured again). Written
-- before acting on it, so a redelivery continues the same decision.
CREATE TABLE payment_commits (
    reservation_id  text PRIMARY KEY,
    outcome         text NOT NULL CHECK (outcome IN ('captured', 'failed')),
    reason          text,
    compensated_at  timestamptz,
    decided_at      timestamptz NOT NULL DEFAULT now()
);

-- Inbound Stripe events, applied once by id.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- A booking's cancellation: written first (what is refunded), then refunds, then the
-- booking's cancelled_at; a second cancel answers this row.
CREATE TABLE booking_cancellations (
    booking_id               text PRIMARY KEY,
    reservation_id           text NOT NULL,
    cancelled_by             text NOT NULL,
    reason                   text,
    requester_refund_amount  bigint NOT NULL DEFAULT 0,
    vendor_refund_amount     bigint NOT NULL DEFAULT 0,
    currency                 text,
    completed_at             timestamptz,
    created_at               timestamptz NOT NULL DEFAULT now()
);
