"""Partner reputation for Prometheus: holds placed against holds committed, per partner.

The counters live in Redis (engine/limits.py keeps them beside each partner's hold cap);
this job reads them for every partner and publishes the busiest ones as gauges
(``slotguard_partner_holds``; the rest fold into ``partner="_other"``). Read-only, so
running it from several workers at once is harmless.
"""

from __future__ import annotations

import asyncio

from engine.directory import list_partner_ids
from engine.runtime import Runtime


async def partner_counts(rt: Runtime) -> dict[str, tuple[int, int]]:
    async with rt.pool.acquire() as conn:
        partners = await list_partner_ids(conn)
    reputations = await asyncio.gather(*(rt.limits.reputation(p) for p in partners))
    return {p: (r["placed"], r["committed"]) for p, r in zip(partners, reputations)}


async def publish_reputation(ctx: dict) -> int:
    """arq cron job: publish every partner's placed/committed counts. Idempotent."""
    metrics = ctx.get("metrics")
    if metrics is None:
        return 0
    counts = await partner_counts(ctx["rt"])
    metrics.partner_reputation(counts)
    return len(counts)
