-- Fencing in Postgres (issue 15): each booking carries the fencing token of the commit
-- decision it came from (lua/transition.lua takes it from the resource's fencing counter,
-- the one hold tokens come from, when the hold passes to COMMIT_IN_PROGRESS). A booking
-- whose token is older than that of a booking already committed on overlapping units of the
-- same resource is refused, cancelled or not: a newer decision on those units was taken
-- after it, so a worker that comes back from a pause (SIGSTOP, a long GC, a partition) with
-- an old commit cannot write it over the newer one. The refusal is an exclusion violation
-- (SQLSTATE 23P01, constraint bookings_fence), so the commit queue treats it as it treats
-- an overlap: the reservation fails as FAILED_AVAILABILITY_CHANGED, nothing is captured.
-- A redelivery of a reservation already booked is not refused (ON CONFLICT leaves it).
-- Rows written before this migration have no token and are never compared.
-- depends: 0006_reservation_blocks

ALTER TABLE bookings ADD COLUMN fence_token bigint;

CREATE INDEX bookings_fence_idx ON bookings (resource_key, fence_token)
    WHERE fence_token IS NOT NULL;

CREATE FUNCTION bookings_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    newer bigint;
BEGIN
    IF NEW.fence_token IS NULL THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM bookings WHERE reservation_id = NEW.reservation_id) THEN
        RETURN NEW;  -- a redelivery: ON CONFLICT (reservation_id) DO NOTHING takes it
    END IF;
    SELECT b.fence_token INTO newer FROM bookings b
    WHERE b.resource_key = NEW.resource_key
      AND b.fence_token > NEW.fence_token
      AND tstzrange(b.block_start, b.block_end, '[)')
          && tstzrange(NEW.block_start, NEW.block_end, '[)')
    ORDER BY b.fence_token DESC LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'exclusion_violation',
            CONSTRAINT = 'bookings_fence',
            MESSAGE = format('fencing token %s of %s is older than token %s already committed '
                             'on these units', NEW.fence_token, NEW.reservation_id, newer);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER bookings_fence BEFORE INSERT ON bookings
    FOR EACH ROW EXECUTE FUNCTION bookings_fence();
