"""The parity cron (issue 17): replay the reservations changed in the last
``SLOTGUARD_PARITY_WINDOW_S`` (but not the last ``SLOTGUARD_PARITY_SETTLE_S``) against their
audit rows (engine/parity.py) and publish the drift counts as
``slotguard_parity_drift_events{status}``, which the worker's ``/metrics`` serves and
``SlotguardParityDrift`` (deploy/prometheus/alerts.yml) watches. Read-only: idempotent, any
number of workers may run it."""

from __future__ import annotations

import logging
import time

from engine import parity

log = logging.getLogger("slotguard.parity")


async def parity_job(ctx: dict) -> dict:
    """One parity run over the recent window; the summary (without the drifted list)."""
    rt = ctx["rt"]
    settings = rt.settings
    now_ms = int(time.time() * 1000)
    summary = await parity.parity(rt.pool, rt.reservations.get,
                                  since_ms=now_ms - settings.parity_window_s * 1000,
                                  settle_ms=settings.parity_settle_s * 1000, now_ms=now_ms,
                                  concurrency=4)
    parity.publish(summary)
    if summary["drift"]:
        log.warning("parity: %s drifted events over %s reservations (%s)", summary["drift"],
                    summary["drifted"], summary["events"])
    return {k: v for k, v in summary.items() if k != "driftedReservations"}
