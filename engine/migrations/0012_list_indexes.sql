-- Keyset pages of the list routes (issue 17): newest first by (created_at, id), per tenant.
-- reservations_partner_idx (partner_id, created_at) already serves a partner's pages.
-- depends: 0006_reservation_blocks

CREATE INDEX reservations_created_idx ON reservations (created_at, id);
CREATE INDEX reservations_vendor_created_idx ON reservations (vendor_id, created_at, id);
CREATE INDEX bookings_partner_created_idx ON bookings (partner_id, created_at, id);
CREATE INDEX bookings_vendor_created_idx ON bookings (vendor_id, created_at, id);
CREATE INDEX bookings_created_idx ON bookings (created_at, id);
