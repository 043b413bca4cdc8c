-- The structured audit log of CRS v3 §3: one row per transition or operator action, keyed by
-- an event id so at-least-once delivery writes it exactly once (DESIGN invariant 3).
-- depends: 0003_bookings

CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL UNIQUE,
    tenant_id       text,
    reservation_id  text,
    resource_id     text,
    action          text NOT NULL,
    actor           text NOT NULL,
    at              timestamptz NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- Queries filter on one of these and page by id (keyset), so id rides along in the index.
CREATE INDEX audit_log_reservation_idx ON audit_log (reservation_id, id);
CREATE INDEX audit_log_resource_idx ON audit_log (resource_id, id);
CREATE INDEX audit_log_actor_idx ON audit_log (actor, id);
-- Rows arrive roughly in time order and never change: a BRIN index serves time ranges at a
-- fraction of a btree's cost on the hot insert path.
CREATE INDEX audit_log_at_idx ON audit_log USING brin (at);

-- Append-only for every role, the owner and superusers included: privileges alone cannot
-- stop the owner, a trigger can. Only DDL (dropping the trigger) gets past it.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

-- ALWAYS: the triggers fire even under session_replication_role = replica, which would
-- otherwise silence them for any superuser session.
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_delete;
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
