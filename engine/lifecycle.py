"""The reservation state machine: states, allowed transitions, actions and staged TTLs.

This table is the only statement of the lifecycle. Python validates against it, and the
Lua scripts receive it generated (``--@include @lifecycle`` expands to :func:`lua_table`),
so it is never written twice by hand.

Main path (Bookiji): INTENT_CREATED → HELD → AWAITING_VENDOR_CONFIRMATION →
CONFIRMED_BY_VENDOR → AWAITING_VENDOR_AUTH → VENDOR_AUTHORIZED → AWAITING_REQUESTER_AUTH →
AUTHORIZED_BOTH → COMMIT_IN_PROGRESS → COMMITTED. Steps a vendor policy waives (instant
book, free booking) are passed through and recorded, never skipped silently.

Departures from the Bookiji table, each for a reason:
- FAILED_AVAILABILITY_CHANGED is reachable from every live pre-commit state (mandatory
  revalidation can fail at any step, not only before commit) and from COMMIT_IN_PROGRESS
  (the Postgres exclusion constraint refused the booking).
- An overdue reservation waiting for its vendor ends FAILED_VENDOR_TIMEOUT, not EXPIRED.
- CANCELLED and EXPIRED are not reachable from COMMIT_IN_PROGRESS: the commit is already
  under way in the worker, which ends it as COMMITTED or FAILED_*; reconciliation handles
  a commit that never finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cache


class State(StrEnum):
    INTENT_CREATED = "INTENT_CREATED"
    HELD = "HELD"
    AWAITING_VENDOR_CONFIRMATION = "AWAITING_VENDOR_CONFIRMATION"
    CONFIRMED_BY_VENDOR = "CONFIRMED_BY_VENDOR"
    AWAITING_VENDOR_AUTH = "AWAITING_VENDOR_AUTH"
    VENDOR_AUTHORIZED = "VENDOR_AUTHORIZED"
    AWAITING_REQUESTER_AUTH = "AWAITING_REQUESTER_AUTH"
    AUTHORIZED_BOTH = "AUTHORIZED_BOTH"
    COMMIT_IN_PROGRESS = "COMMIT_IN_PROGRESS"
    COMMITTED = "COMMITTED"
    FAILED_VENDOR_TIMEOUT = "FAILED_VENDOR_TIMEOUT"
    FAILED_VENDOR_AUTH = "FAILED_VENDOR_AUTH"
    FAILED_REQUESTER_AUTH = "FAILED_REQUESTER_AUTH"
    FAILED_AVAILABILITY_CHANGED = "FAILED_AVAILABILITY_CHANGED"
    FAILED_COMMIT = "FAILED_COMMIT"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


# ---- the rest of the vocabulary: who acts, which roles exist, what a unit key may hold ----
# Roles of an API key (engine/permissions.py decides what each may do).
ROLES = ("partner", "vendor", "ops", "admin", "system")
PARTNER, VENDOR, OPS, ADMIN, SYSTEM = ROLES
# Who a transition records as ``triggeredBy``: a role, the requester, or the reaper.
ACTORS = frozenset({"system", "vendor", "requester", "partner", "timeout", "ops", "admin"})
# A unit key whose value starts with this is a booked marker (committed), not a hold.
BOOKED_PREFIX = "B|"
# The partner scope of reservations created by system keys: their partner id, and the hash
# tag of their cap and idempotency records. It starts with a character no partner id may
# start with (engine/keys.py NAME_RE), so no partner can ever share it.
SYSTEM_SCOPE = "_system"
# Partner ids refused at creation: role names and words that read as the service itself.
RESERVED_PARTNER_IDS = frozenset({*ROLES, "internal", "root", "slotguard", "service",
                                  "anonymous", "public", "everyone", "all", "none", "null",
                                  "requester", "timeout", "sg"})

S = State
MAIN_PATH = [
    S.INTENT_CREATED, S.HELD, S.AWAITING_VENDOR_CONFIRMATION, S.CONFIRMED_BY_VENDOR,
    S.AWAITING_VENDOR_AUTH, S.VENDOR_AUTHORIZED, S.AWAITING_REQUESTER_AUTH,
    S.AUTHORIZED_BOTH, S.COMMIT_IN_PROGRESS, S.COMMITTED,
]
TERMINAL = frozenset({
    S.COMMITTED, S.FAILED_VENDOR_TIMEOUT, S.FAILED_VENDOR_AUTH, S.FAILED_REQUESTER_AUTH,
    S.FAILED_AVAILABILITY_CHANGED, S.FAILED_COMMIT, S.EXPIRED, S.CANCELLED,
})
# Live states before the commit: the hold is soft, may expire, be cancelled or fail revalidation.
PRE_COMMIT = frozenset(MAIN_PATH[:8])


def _edges() -> frozenset[tuple[State, State]]:
    edges = set(zip(MAIN_PATH, MAIN_PATH[1:]))
    edges |= {
        (S.AWAITING_VENDOR_CONFIRMATION, S.FAILED_VENDOR_TIMEOUT),
        (S.AWAITING_VENDOR_AUTH, S.FAILED_VENDOR_AUTH),
        (S.AWAITING_REQUESTER_AUTH, S.FAILED_REQUESTER_AUTH),
        (S.COMMIT_IN_PROGRESS, S.FAILED_COMMIT),
        (S.COMMIT_IN_PROGRESS, S.FAILED_AVAILABILITY_CHANGED),
    }
    for state in PRE_COMMIT:
        edges |= {(state, S.CANCELLED), (state, S.EXPIRED), (state, S.FAILED_AVAILABILITY_CHANGED)}
    # Waiting for the vendor ends in the vendor's timeout, never in a plain expiry.
    edges -= {(S.HELD, S.EXPIRED), (S.AWAITING_VENDOR_CONFIRMATION, S.EXPIRED)}
    return frozenset(edges)


EDGES = _edges()


def allowed(from_state: State, to_state: State) -> bool:
    return (from_state, to_state) in EDGES


# Steps taken without a caller, right after entering the key state. `when` names the
# vendor policy that must waive the step ("always" for notification-only steps).
@dataclass(frozen=True, slots=True)
class AutoStep:
    to: State
    when: str  # always | confirmation_waived | payment_waived


AUTO = {
    S.INTENT_CREATED: AutoStep(S.HELD, "always"),
    S.HELD: AutoStep(S.AWAITING_VENDOR_CONFIRMATION, "always"),
    S.AWAITING_VENDOR_CONFIRMATION: AutoStep(S.CONFIRMED_BY_VENDOR, "confirmation_waived"),
    S.CONFIRMED_BY_VENDOR: AutoStep(S.AWAITING_VENDOR_AUTH, "always"),
    S.AWAITING_VENDOR_AUTH: AutoStep(S.VENDOR_AUTHORIZED, "payment_waived"),
    S.VENDOR_AUTHORIZED: AutoStep(S.AWAITING_REQUESTER_AUTH, "always"),
    S.AWAITING_REQUESTER_AUTH: AutoStep(S.AUTHORIZED_BOTH, "payment_waived"),
}


@dataclass(frozen=True, slots=True)
class Action:
    """A caller's request: from ``source`` (None = any pre-commit state) to ``target``."""

    name: str
    target: State
    source: State | None


ACTIONS = {
    a.name: a
    for a in [
        Action("vendor-confirmation", S.CONFIRMED_BY_VENDOR, S.AWAITING_VENDOR_CONFIRMATION),
        Action("vendor-authorization", S.VENDOR_AUTHORIZED, S.AWAITING_VENDOR_AUTH),
        Action("vendor-authorization-failed", S.FAILED_VENDOR_AUTH, S.AWAITING_VENDOR_AUTH),
        Action("requester-authorization", S.AUTHORIZED_BOTH, S.AWAITING_REQUESTER_AUTH),
        Action("requester-authorization-failed", S.FAILED_REQUESTER_AUTH,
               S.AWAITING_REQUESTER_AUTH),
        Action("commit", S.COMMIT_IN_PROGRESS, S.AUTHORIZED_BOTH),
        Action("cancel", S.CANCELLED, None),
        Action("finalize-commit", S.COMMITTED, S.COMMIT_IN_PROGRESS),
        Action("fail-commit", S.FAILED_COMMIT, S.COMMIT_IN_PROGRESS),
        Action("availability-changed", S.FAILED_AVAILABILITY_CHANGED, None),
    ]
}

# Staged TTLs: entering one of these states sets the deadline to now + the named stage TTL
# (settings: hold_ttl_ms, confirmed_ttl_ms, authorized_ttl_ms). Other states keep theirs.
STAGE_TTL = {
    S.HELD: "hold",
    S.CONFIRMED_BY_VENDOR: "confirmed",
    S.AUTHORIZED_BOTH: "authorized",
}

# What an overdue reservation becomes: waiting for the vendor is the vendor's timeout.
EXPIRES_AS = {state: S.EXPIRED for state in PRE_COMMIT}
EXPIRES_AS[S.AWAITING_VENDOR_CONFIRMATION] = S.FAILED_VENDOR_TIMEOUT
EXPIRES_AS[S.HELD] = S.FAILED_VENDOR_TIMEOUT


def walk_auto_steps(path: list[State], confirmation_required: bool,
                    payment_required: bool) -> list[State]:
    """``path`` extended by the steps taken without a caller (mirrors lua/lib/walk_auto_steps)."""
    path = list(path)
    while (step := AUTO.get(path[-1])) is not None:
        if step.when == "confirmation_waived" and confirmation_required:
            break
        if step.when == "payment_waived" and payment_required:
            break
        path.append(step.to)
    return path


@cache  # two booleans: four answers, asked on every creation
def creation_stage(confirmation_required: bool, payment_required: bool) -> str:
    """The staged TTL a new reservation stops under ("hold", "confirmed" or "authorized")."""
    path = walk_auto_steps([S.INTENT_CREATED], confirmation_required, payment_required)
    return [STAGE_TTL[s] for s in path if s in STAGE_TTL][-1]


def lua_table() -> str:
    """The lifecycle as Lua tables, included by the scripts (``--@include @lifecycle``)."""

    def lua_set(values) -> str:
        return "{" + ", ".join(f"['{v}']=true" for v in sorted(values)) + "}"

    edges: dict[str, set[str]] = {}
    for a, b in sorted(EDGES):
        edges.setdefault(a.value, set()).add(b.value)
    lines = ["-- Generated from engine/lifecycle.py; do not edit by hand."]
    lines.append(f"local BOOKED_PREFIX = '{BOOKED_PREFIX}'")
    lines.append("local EDGES = {")
    for state, targets in sorted(edges.items()):
        lines.append(f"  ['{state}'] = {lua_set(targets)},")
    lines.append("}")
    lines.append(f"local TERMINAL = {lua_set(s.value for s in TERMINAL)}")
    lines.append(f"local PRE_COMMIT = {lua_set(s.value for s in PRE_COMMIT)}")
    lines.append("local AUTO = {")
    for state, step in AUTO.items():
        lines.append(f"  ['{state.value}'] = {{to='{step.to.value}', when='{step.when}'}},")
    lines.append("}")
    lines.append("local ACTIONS = {")
    for action in ACTIONS.values():
        source = f"'{action.source.value}'" if action.source else "nil"
        lines.append(f"  ['{action.name}'] = {{to='{action.target.value}', from={source}}},")
    lines.append("}")
    lines.append("local STAGE_TTL = {")
    for state, stage in STAGE_TTL.items():
        lines.append(f"  ['{state.value}'] = '{stage}',")
    lines.append("}")
    lines.append("local EXPIRES_AS = {")
    for state, target in sorted(EXPIRES_AS.items()):
        lines.append(f"  ['{state.value}'] = '{target.value}',")
    lines.append("}")
    return "\n".join(lines) + "\n"
