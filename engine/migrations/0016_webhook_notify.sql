-- Events out (issue 14): new deliveries wake the webhook dispatcher at once (LISTEN
-- slotguard_webhooks, engine/webhook_delivery.py) instead of at its next poll. One
-- notification per inserting statement, sent when its transaction commits (so never for
-- rows that are not visible yet); the payload is the table's schema, so each deployment's
-- (and each test's) dispatcher wakes only for its own. The poll stays as the fallback.
-- depends: 0009_webhooks

CREATE FUNCTION webhook_deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN  -- an outbox write with no endpoint: silence
        PERFORM pg_notify('slotguard_webhooks', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_deliveries_notify
    AFTER INSERT ON webhook_deliveries REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_deliveries_notify();
