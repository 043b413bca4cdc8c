-- Issue 16 (pool): a vendor's resources under one Redis hash tag, and resource groups.
--
-- `shard_key` is the string whose crc32 picks a resource's Redis shard (engine/keys.py).
-- Resources that exist now keep their own id as key, so no Redis key moves with this
-- migration; resources created from now on use their vendor's id (engine/directory.py), and
-- `slotguard rekey --vendor V` moves a quiesced vendor's older resources onto it. Vendors
-- still spread over the shards, so a Redis Cluster stays balanced across vendors.
-- depends: 0006_reservation_blocks

ALTER TABLE resources ADD COLUMN shard_key text;
UPDATE resources SET shard_key = id WHERE shard_key IS NULL;
ALTER TABLE resources ALTER COLUMN shard_key SET NOT NULL;

-- A resource group ("room type"): members of one vendor a pooled hold picks from by the
-- group's strategy. `params` holds the strategy's own fields (preferred order, adjacency
-- anchor), checked by the service layer.
CREATE TABLE resource_groups (
    vendor_id   text NOT NULL REFERENCES vendors (id),
    group_id    text NOT NULL,
    strategy    text NOT NULL CHECK (strategy IN ('first_fit', 'best_fit', 'adjacent',
                                                  'preferred')),
    params      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vendor_id, group_id)
);

CREATE TABLE resource_group_members (
    vendor_id    text NOT NULL,
    group_id     text NOT NULL,
    resource_id  text NOT NULL REFERENCES resources (id),
    position     integer NOT NULL,
    PRIMARY KEY (vendor_id, group_id, resource_id),
    FOREIGN KEY (vendor_id, group_id) REFERENCES resource_groups (vendor_id, group_id)
        ON DELETE CASCADE
);

-- Multi-resource reservations: one booking row per item, each under the exclusion
-- constraint; item 0 keeps the reservation's booking id (engine/store/commit.py).
ALTER TABLE bookings ADD COLUMN item integer NOT NULL DEFAULT 0 CHECK (item >= 0);
ALTER TABLE bookings DROP CONSTRAINT bookings_reservation_id_key;
ALTER TABLE bookings ADD CONSTRAINT bookings_reservation_item_key UNIQUE (reservation_id, item);
