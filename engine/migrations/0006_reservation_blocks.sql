-- The buffered interval on the reservation snapshot: the commit queue's later entries carry
-- only the reservation id (the unchanging fields travel on the creation entry), so a commit
-- finds the interval to book here.
-- depends: 0005_manual_review

ALTER TABLE reservations ADD COLUMN block_start timestamptz, ADD COLUMN block_end timestamptz;

-- Reservations written before: the booking's interval where there is one, else the slot
-- widened by the resource's buffers.
UPDATE reservations r
SET block_start = r.slot_start - x.buffer_before_minutes * interval '1 minute',
    block_end = r.slot_end + x.buffer_after_minutes * interval '1 minute'
FROM resources x WHERE x.id = r.resource_id AND r.block_start IS NULL;
UPDATE reservations r SET block_start = b.block_start, block_end = b.block_end
FROM bookings b WHERE b.reservation_id = r.id;
