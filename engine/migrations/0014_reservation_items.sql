-- Issue 16 (pool2): every item of a reservation on its Postgres row, so Postgres is the
-- record of a multi-resource reservation's items, not only of its first one.
--
-- `items` is a JSON array, one object per item in the reservation's order:
--   {"resourceId": text, "slotStart": ms, "slotEnd": ms, "blockStart": ms, "blockEnd": ms}
-- (times in ms since the epoch, as the audit log's `modification`). A one-resource
-- reservation has one item, the same as its resource_id / slot / block columns, which keep
-- naming item 0 for readers that know one resource. The commit queue writes it with the
-- snapshot (engine/store/commit.py, same statement, same transaction).
-- depends: 0012_list_indexes

ALTER TABLE reservations ADD COLUMN items jsonb;

-- Existing rows: one item per reservation from its own columns; a multi-resource
-- reservation created before this migration that has committed gets every item back from
-- its booking rows (one per item, 0011). A multi-resource reservation not committed yet
-- gets its full list from its next stream entry (every entry carries the items).
UPDATE reservations r SET items = coalesce(
    (SELECT jsonb_agg(jsonb_build_object(
                'resourceId', b.resource_id,
                'slotStart', (extract(epoch FROM b.slot_start) * 1000)::bigint,
                'slotEnd', (extract(epoch FROM b.slot_end) * 1000)::bigint,
                'blockStart', (extract(epoch FROM b.block_start) * 1000)::bigint,
                'blockEnd', (extract(epoch FROM b.block_end) * 1000)::bigint) ORDER BY b.item)
     FROM bookings b WHERE b.reservation_id = r.id
     HAVING count(*) > 1),
    jsonb_build_array(jsonb_build_object(
        'resourceId', r.resource_id,
        'slotStart', (extract(epoch FROM r.slot_start) * 1000)::bigint,
        'slotEnd', (extract(epoch FROM r.slot_end) * 1000)::bigint,
        'blockStart', (extract(epoch FROM coalesce(r.block_start, r.slot_start)) * 1000)::bigint,
        'blockEnd', (extract(epoch FROM coalesce(r.block_end, r.slot_end)) * 1000)::bigint)));

ALTER TABLE reservations ALTER COLUMN items SET NOT NULL;
ALTER TABLE reservations ADD CONSTRAINT reservations_items_shape
    CHECK (jsonb_typeof(items) = 'array' AND jsonb_array_length(items) >= 1);
