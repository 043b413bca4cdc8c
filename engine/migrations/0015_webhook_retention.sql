-- Events out (issue 14): retention of the outbox and the delivery log
-- (jobs/webhook_retention.py, SLOTGUARD_WEBHOOK_RETENTION_DAYS).
-- depends: 0009_webhooks

-- The settled deliveries (delivered, failed on a final 4xx, dead) by age: the retention
-- job deletes the oldest first, in bounded batches; pending ones are never in it.
CREATE INDEX webhook_deliveries_settled_idx ON webhook_deliveries (created_at)
    WHERE status <> 'pending';
-- Deliveries by event: an event is deleted only when no delivery refers to it (and the
-- foreign key's check on each deleted event is a probe, not a scan).
CREATE INDEX webhook_deliveries_event_idx ON webhook_deliveries (event_position);
-- The outbox by age.
CREATE INDEX webhook_events_emitted_idx ON webhook_events (emitted_at);
