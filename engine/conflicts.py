"""What a conflict tells its caller (issue 17): the conflicting interval in ISO times, and
the holder's reservation id only when the caller may know it.

The script names the first taken unit and its holder. The answer says instead:

- ``conflictingStart`` / ``conflictingEnd``: the interval the holder blocks (its slot with
  its buffers, read from the holder's record in one extra Redis read, on conflicts only),
  or, when no record says so (a plain hold, a booked marker whose record has retired), the
  taken unit's own interval;
- ``conflictingReservationId``: for ops, admin and system keys always; for a partner only
  when the holder is one of its own reservations; never for a vendor key;
- ``booked``: whether a booking (not a live hold) holds it.

The unit index (``conflictingUnit``) is not shown: it meant nothing to a partner.
"""

from __future__ import annotations

import logging

from engine.errors import HoldConflict
from engine.keys import KeySpace
from engine.lifecycle import ADMIN, OPS, PARTNER, SYSTEM
from engine.permissions import Principal
from engine.resources import Resource
from engine.times import format_time

log = logging.getLogger("slotguard.conflicts")


async def readable_conflict(principal: Principal, exc: HoldConflict, resource: Resource,
                            redis, keys: KeySpace) -> HoldConflict:
    start = exc.unit * resource.unit_ms
    end = start + resource.unit_ms
    owner = None
    try:
        record = keys.reservation(exc.holder)
    except ValueError:  # not a reservation id (a bare hold): the unit is all we know
        record = None
    if record is not None:
        try:
            owner, block_start, block_end = await redis.hmget(record, "p", "bs", "be")
            if block_start and block_end:
                start, end = int(block_start), int(block_end)
        except Exception:  # noqa: BLE001 (the details degrade to the unit, the 409 stands)
            log.warning("could not read the holder of a conflict", exc_info=True)
            owner = None
    details = {"resourceId": exc.details.get("resourceId", resource.id),
               "conflictingStart": format_time(start), "conflictingEnd": format_time(end),
               "booked": exc.booked}
    if principal.role in (OPS, ADMIN, SYSTEM) or (
            principal.role == PARTNER and owner is not None
            and owner == principal.partner_id):
        details["conflictingReservationId"] = exc.holder
    return HoldConflict(exc.message, holder=exc.holder, unit=exc.unit, booked=exc.booked,
                        details=details)
