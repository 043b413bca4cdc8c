"""What the worker reports to Prometheus (the metric objects live in engine/metrics.py)."""

from __future__ import annotations

import hashlib

from engine import metrics as m

_EXPIRY_STATES = {"EXPIRED", "FAILED_VENDOR_TIMEOUT"}


def partner_label(partner_id: str, *, plain: bool) -> str:
    """A partner's metric label: its id only when SLOTGUARD_METRICS_PARTNER_LABELS allows it,
    else a stable digest (the exposition has no authentication)."""
    if plain or partner_id == "_other":
        return partner_id
    return "p_" + hashlib.sha256(partner_id.encode()).hexdigest()[:12]


class WorkerMetrics:
    def __init__(self, *, partner_labels: bool = False,
                 partner_series: int = m.MAX_PARTNER_SERIES) -> None:
        self.partner_labels = partner_labels
        self.partner_series = partner_series  # SLOTGUARD_METRICS_PARTNER_SERIES (issue 17)

    def observe_script(self, script: str, seconds: float, batch_size: int) -> None:
        m.LUA_CALL_SECONDS.labels(script=script).observe(seconds)

    def expiry_lag(self, seconds: float) -> None:
        """One expiry recorded by the reaper, ``seconds`` after its deadline."""
        m.EXPIRY_LAG_SECONDS.observe(seconds)

    def observe_drain(self, shard: int, entries: int, seconds: float) -> None:
        m.DRAIN_BATCH_ENTRIES.observe(entries)
        m.DRAIN_SECONDS.observe(seconds)

    def transition(self, from_state: str, to_state: str, triggered_by: str) -> None:
        """One newly recorded transition (the drain counts each event once, in effect)."""
        m.TRANSITIONS.labels(from_state=from_state, to_state=to_state).inc()
        if to_state in _EXPIRY_STATES and triggered_by == "timeout":
            m.HOLDS_EXPIRED.inc()

    def dead_letter(self, shard: int) -> None:
        m.DEAD_LETTERS.inc()

    async def observe_queues(self, queue) -> None:
        for shard in range(queue.keys.shards):
            lag = await queue.lag(shard)
            label = str(shard)
            m.COMMIT_QUEUE_LENGTH.labels(shard=label).set(lag["length"])
            m.COMMIT_QUEUE_PENDING.labels(shard=label).set(lag["pending"])
            m.COMMIT_QUEUE_OLDEST_AGE_SECONDS.labels(shard=label).set(
                lag["oldest_pending_age_ms"] / 1000)

    def reconciliation(self, report) -> None:
        for kind, n in report.findings.items():
            m.RECONCILE_FINDINGS.labels(kind=kind).inc(n)
        for kind, n in report.fixes.items():
            m.RECONCILE_FIXES.labels(kind=kind).inc(n)
        for kind, n in report.escalated.items():
            m.RECONCILE_UNFIXED.labels(kind=kind).inc(n)

    def partner_reputation(self, counts: dict[str, tuple[int, int]]) -> None:
        m.publish_partner_reputation(
            {partner_label(p, plain=self.partner_labels): c for p, c in counts.items()},
            limit=self.partner_series)
