"""Who may do what: the one permission table (operation -> roles) and tenancy.

Every API operation is named here and checked by the service layer (engine/service.py),
never in a route handler. A role missing from an operation's set is refused (403). A
partner sees only its own reservations and a vendor only its vendor's: anything else is
reported as not found (404), so a caller cannot probe another tenant's ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import EngineError, NotFound
from engine.lifecycle import ADMIN, OPS, PARTNER, ROLES, SYSTEM, VENDOR

__all__ = ["ADMIN", "OPS", "PARTNER", "ROLES", "SYSTEM", "VENDOR", "Forbidden", "Principal",
           "require", "can_see", "require_tenant", "require_vendor_scope"]

PERMISSIONS: dict[str, frozenset[str]] = {
    # reservations
    "reservation.create": frozenset({PARTNER, SYSTEM}),
    "reservation.read": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    "reservation.cancel": frozenset({PARTNER, VENDOR, SYSTEM}),
    "reservation.extend": frozenset({PARTNER, SYSTEM}),
    "reservation.modify": frozenset({PARTNER, OPS, ADMIN, SYSTEM}),
    "reservation.commit": frozenset({PARTNER, SYSTEM}),
    "reservation.requester-authorization": frozenset({PARTNER, SYSTEM}),
    "reservation.vendor-confirmation": frozenset({VENDOR, SYSTEM}),
    "reservation.vendor-authorization": frozenset({VENDOR, SYSTEM}),
    "availability.read": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    # payments (issue 12): the partner of the booking, its vendor, ops
    "booking.cancel": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    # hold transfer and waitlist (issue 16): only partners hold, so only partners hand over
    "reservation.transfer-offer": frozenset({PARTNER}),
    "reservation.transfer": frozenset({PARTNER}),
    "waitlist.create": frozenset({PARTNER, SYSTEM}),
    "waitlist.read": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    "waitlist.withdraw": frozenset({PARTNER, OPS, ADMIN, SYSTEM}),
    # availability inputs (issue 13): a vendor key for its own vendor (require_vendor_scope)
    "availability.rules.read": frozenset({VENDOR, OPS, ADMIN, SYSTEM}),
    "availability.rules.write": frozenset({VENDOR, ADMIN, SYSTEM}),
    # operations
    "ops.release": frozenset({OPS, ADMIN, SYSTEM}),
    "ops.bulk-release": frozenset({OPS, ADMIN, SYSTEM}),
    "ops.audit": frozenset({OPS, ADMIN, SYSTEM}),
    # management
    "admin.partners.create": frozenset({ADMIN, SYSTEM}),
    "admin.vendors.create": frozenset({ADMIN, SYSTEM}),
    "admin.resources.create": frozenset({ADMIN, SYSTEM}),
    "admin.keys.create": frozenset({ADMIN, SYSTEM}),
    "admin.keys.revoke": frozenset({ADMIN, SYSTEM}),
    # events out (issue 14): each role manages its own tenancy's endpoints and stream
    "webhooks.manage": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    "events.stream": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    # resource groups (issue 16, pool): the vendor manages its own, admin any
    "groups.write": frozenset({VENDOR, ADMIN, SYSTEM}),
    "groups.read": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    # Lists with cursors (issue 17): tenancy narrows partners and vendors to their own rows.
    "reservation.list": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    "booking.list": frozenset({PARTNER, VENDOR, OPS, ADMIN, SYSTEM}),
    "admin.vendors.list": frozenset({ADMIN, SYSTEM}),
    "admin.partners.list": frozenset({ADMIN, SYSTEM}),
    "admin.keys.list": frozenset({ADMIN, SYSTEM}),
}

# The lifecycle actor recorded as ``triggeredBy`` when a role acts.
ACTOR_OF_ROLE = {PARTNER: "partner", VENDOR: "vendor", OPS: "ops", ADMIN: "admin",
                 SYSTEM: "system"}


class Forbidden(EngineError):
    code = "FORBIDDEN"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key's role and the tenant it is bound to."""

    key_id: str
    role: str
    partner_id: str | None = None
    vendor_id: str | None = None

    @property
    def actor(self) -> str:
        return ACTOR_OF_ROLE[self.role]


def require(principal: Principal, operation: str) -> None:
    """Raise Forbidden unless the principal's role may perform ``operation``."""
    roles = PERMISSIONS[operation]  # KeyError: an operation missing from the table is a bug
    if principal.role not in roles:
        raise Forbidden(f"role {principal.role!r} may not {operation}",
                        details={"operation": operation, "role": principal.role})


def can_see(principal: Principal, partner_id: str, vendor_id: str) -> bool:
    """Tenancy: partners see their own reservations, vendors their vendor's."""
    if principal.role == PARTNER:
        return principal.partner_id == partner_id
    if principal.role == VENDOR:
        return principal.vendor_id == vendor_id
    return True


def require_tenant(principal: Principal, partner_id: str, vendor_id: str,
                   reservation_id: str) -> None:
    if not can_see(principal, partner_id, vendor_id):
        raise NotFound("reservation not found", details={"reservationId": reservation_id})


def require_vendor_scope(principal: Principal, vendor_id: str) -> None:
    """A vendor key reads only its own vendor's availability (others: not found)."""
    if principal.role == VENDOR and principal.vendor_id != vendor_id:
        raise NotFound(f"unknown vendor {vendor_id!r}", code="UNKNOWN_VENDOR",
                       details={"vendorId": vendor_id})
