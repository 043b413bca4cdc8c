-- Committed bookings: the second line of defence against double booking (DESIGN invariant 1).
-- block_start/block_end is the buffered interval the hold owned; that is what may not overlap.
-- depends: 0002_reservations

CREATE TABLE bookings (
    id              text PRIMARY KEY,
    reservation_id  text NOT NULL UNIQUE,
    -- No foreign key: the insert joins resources to find the key (resources are never
    -- deleted), and an FK check would take a share lock on the hot resource row per booking.
    resource_key    bigint NOT NULL,
    resource_id     text NOT NULL,
    vendor_id       text NOT NULL,
    partner_id      text NOT NULL,
    requester_id    text NOT NULL,
    slot_start      timestamptz NOT NULL,
    slot_end        timestamptz NOT NULL,
    block_start     timestamptz NOT NULL,
    block_end       timestamptz NOT NULL,
    during          tstzrange GENERATED ALWAYS AS (tstzrange(block_start, block_end, '[)')) STORED,
    created_at      timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz,
    CONSTRAINT bookings_interval_order
        CHECK (block_start <= slot_start AND slot_start < slot_end AND slot_end <= block_end),
    -- Core GiST range opclasses only (no btree_gist): the resource is a one-point int8range.
    -- Half-open '[)' ranges, so touching bookings do not collide. A cancelled booking frees
    -- its interval.
    CONSTRAINT bookings_no_overlap EXCLUDE USING gist (
        int8range(resource_key, resource_key, '[]') WITH &&,
        tstzrange(block_start, block_end, '[)') WITH &&
    ) WHERE (cancelled_at IS NULL)
);
-- Rehydration reads every live booking that has not ended yet.
CREATE INDEX bookings_live_end_idx ON bookings (block_end) WHERE cancelled_at IS NULL;
