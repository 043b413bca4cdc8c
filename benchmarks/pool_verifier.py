"""The pooled-hold check over a client history (issue 16, pool): a pooled create answered
POOL_FULL must have met every member taken. benchmarks/verifier.py proves no double booking;
this proves the pool was never reported full while a member was free.

A POOL_FULL answer was decided at some instant of ``[sent, answered]``. A hold on a member
can have been live at that instant only within ``[its create's sent, its cancel's answered]``
(no cancel answered: until the end). So a POOL_FULL is refuted, with no false alarm, when
some member had no hold overlapping the stay's units whose window meets the answer's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

from benchmarks import history as h
from benchmarks.verifier import INF, Violation

POOL_FULL = "pool_full"  # the outcome of a pooled create refused with POOL_FULL


class PoolFull(NamedTuple):
    group: str
    members: tuple[tuple[str, int, int], ...]  # (resource, first, last) of each candidate
    sent: float
    answered: float


def check_pool_full(entries: Iterable[h.Entry], refusals: Iterable[PoolFull]
                    ) -> list[Violation]:
    entries = list(entries)
    cancelled = {e.id: e.answered for e in entries
                 if e.op in h.ENDING and e.outcome == h.OK}
    windows: dict[str, list[tuple[int, int, float, float]]] = defaultdict(list)
    for e in entries:
        if e.op == h.CREATE and e.outcome == h.OK:
            windows[e.resource].append((e.first, e.last, e.sent, cancelled.get(e.id, INF)))
    violations = []
    for refusal in refusals:
        for resource, first, last in refusal.members:
            taken = any(f <= last and first <= l and start <= refusal.answered
                        and end >= refusal.sent
                        for f, l, start, end in windows.get(resource, ()))
            if not taken:
                violations.append(Violation(
                    "pool_full_with_free_member", (refusal.group, resource),
                    f"POOL_FULL answered while {resource} units {first}..{last} were free"))
                break
    return violations
