"""Deprecated home of the store: a thin re-export for callers not yet moved to
:mod:`engine.store` (api/app.py, api/routes/ops.py, tests of other modules). New code imports
from ``engine.store.*``."""

from engine.store.commit import AppliedBatch, apply_batch, apply_events, known_info  # noqa: F401
from engine.store.events import (  # noqa: F401
    ACTORS,
    FIELD_LAYOUT,
    STATES,
    EventOutcome,
    EventResult,
    booking_id_for,
    expand_entry,
    fields_dict,
)
from engine.store.queries import (  # noqa: F401
    MAX_AUDIT_PAGE,
    AuditEntry,
    Booking,
    StoredReservation,
    Transition,
    bookings_to_rehydrate,
    load_reservation,
    query_audit,
    record_audit,
)
from engine.store.review import record_dead_letter, record_manual_review  # noqa: F401
