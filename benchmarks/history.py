"""The client history: what every load process asked and what it was answered.

The verifier holds the final Redis and Postgres state against it (benchmarks/verifier.py),
so an entry records enough to check a success later: the id it is about, the units it
covers, and when the request left and the answer came back (``time.monotonic()``, which on
Linux is one clock for every process of the machine, so histories of processes compare).
"""

from __future__ import annotations

from typing import NamedTuple

# Operations.
PLACE = "place"  # a plain hold (HoldEngine or the bare script): id is the hold id
CREATE = "create"  # a reservation created (engine or POST /v1/reservations)
RELEASE = "release"  # a hold released with its fence token
CANCEL = "cancel"  # a reservation cancelled
COMMIT = "commit"  # a reservation sent to the commit queue (202)
COMMITTED = "committed"  # a read that answered state COMMITTED
PG_INSERT = "pg_insert"  # a booking row inserted by a Postgres-only baseline

# Outcomes.
OK = "ok"
CONFLICT = "conflict"
ERROR = "error"

ACQUIRING = frozenset({PLACE, CREATE, PG_INSERT})
ENDING = frozenset({RELEASE, CANCEL})


class Entry(NamedTuple):
    op: str
    outcome: str
    id: str = ""  # the hold / reservation / booking the operation is about ('' if unknown)
    resource: str = ""
    first: int = 0  # inclusive unit range, buffers included
    last: int = -1
    sent: float = 0.0
    answered: float = 0.0
    holder: str = ""  # conflicts: the holder the answer named ('' when not disclosed)
    unit: int = -1  # conflicts: the unit the answer named
    table: str = ""  # PG_INSERT: the table the row went to
    expires_ms: int = 0  # PLACE successes: when the hold expires by itself (ms since epoch)
