"""Who exists: partners, vendors, their resources and API keys, as the admin API and CLI see them.

Every function takes an asyncpg connection whose ``search_path`` is the deployment's schema
(``engine.db.create_pool``). Input is validated before the first write; a duplicate id or an
unknown parent comes back as a typed error, and a failed call leaves nothing behind (the
functions that write two rows do so in one transaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from engine.db import columns
from engine.errors import EngineError, NotFound, UnknownResource, ValidationError
from engine.keys import NAME_RE
from engine.lifecycle import RESERVED_PARTNER_IDS, ROLES
from engine.resources import MINUTE_MS, Resource, ResourceCatalog
from engine.resources import Vendor as EngineVendor

MIN_DIGEST_CHARS = 32  # mirrors the api_keys check: a digest, never a plaintext key


class AlreadyExists(EngineError):
    code = "ALREADY_EXISTS"


class UnknownVendor(NotFound):
    code = "UNKNOWN_VENDOR"


class UnknownPartner(NotFound):
    code = "UNKNOWN_PARTNER"


@dataclass(frozen=True, slots=True)
class Partner:
    id: str
    name: str
    active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Vendor:
    id: str
    unit_minutes: int
    buffer_before_minutes: int
    buffer_after_minutes: int
    confirmation_required: bool
    payment_required: bool
    timezone: str
    created_at: datetime
    # Payment terms (issue 12, migration 0008): minor units, ISO 4217 lower case.
    price_amount: int | None = None
    deposit_amount: int | None = None
    currency: str | None = None
    stripe_account_id: str | None = None
    refund_policy: str = "full"
    refund_cutoff_minutes: int | None = None

    @property
    def terms(self):
        from engine.payments.terms import PaymentTerms

        return PaymentTerms(self.payment_required, self.price_amount, self.deposit_amount,
                            self.currency, self.stripe_account_id, self.refund_policy,
                            self.refund_cutoff_minutes)

    @property
    def default_resource_id(self) -> str:
        return default_resource_id(self.id)

    def to_engine(self) -> EngineVendor:
        """The lifecycle's view: the policy that decides which steps are waived."""
        return EngineVendor(self.id, self.default_resource_id, self.confirmation_required,
                            self.payment_required, self.timezone)


@dataclass(frozen=True, slots=True)
class StoredResource:
    key: int  # the integer identity the bookings exclusion constraint compares
    id: str
    vendor_id: str
    unit_minutes: int
    buffer_before_minutes: int
    buffer_after_minutes: int
    created_at: datetime
    shard_key: str  # what picks its Redis shard: its own id (before 0011) or its vendor's

    def to_engine(self) -> Resource:
        """The hold engine's view: the same unit grid and buffers in milliseconds."""
        return Resource(self.id, unit_ms=self.unit_minutes * MINUTE_MS,
                        buffer_before_ms=self.buffer_before_minutes * MINUTE_MS,
                        buffer_after_ms=self.buffer_after_minutes * MINUTE_MS,
                        vendor_id=self.vendor_id, shard_key=self.shard_key)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    prefix: str
    digest: str
    role: str
    partner_id: str | None
    vendor_id: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def default_resource_id(vendor_id: str) -> str:
    """A vendor's first resource shares its id, so a one-calendar vendor needs no lookup."""
    return vendor_id


# ---- partners ---------------------------------------------------------------------------
async def create_partner(conn: asyncpg.Connection, partner_id: str, name: str, *,
                         active: bool = True) -> Partner:
    _check_name("partnerId", partner_id)
    if partner_id.lower() in RESERVED_PARTNER_IDS:
        # A partner named like a role (``system``) must never be mistaken for it.
        raise ValidationError(f"partnerId {partner_id!r} is a reserved word",
                              code="RESERVED_PARTNER_ID",
                              details={"field": "partnerId", "partnerId": partner_id})
    if not name.strip():
        raise ValidationError("partner name must not be empty", details={"field": "name"})
    try:
        row = await conn.fetchrow(
            f"INSERT INTO partners (id, name, active) VALUES ($1, $2, $3) RETURNING {columns(Partner)}",
            partner_id, name, active)
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"partner {partner_id!r} already exists",
                            details={"partnerId": partner_id}) from None
    return Partner(**row)


async def get_partner(conn: asyncpg.Connection, partner_id: str) -> Partner:
    row = await conn.fetchrow(f"SELECT {columns(Partner)} FROM partners WHERE id = $1",
                              partner_id)
    if row is None:
        raise UnknownPartner(f"unknown partner {partner_id!r}", details={"partnerId": partner_id})
    return Partner(**row)


async def list_partner_ids(conn: asyncpg.Connection) -> list[str]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM partners ORDER BY id")]


# ---- vendors and resources --------------------------------------------------------------
async def create_vendor(conn: asyncpg.Connection, vendor_id: str, *, unit_minutes: int = 15,
                        buffer_before_minutes: int = 0, buffer_after_minutes: int = 0,
                        confirmation_required: bool = True, payment_required: bool = False,
                        timezone: str = "UTC", terms=None) -> Vendor:
    """Create a vendor and its default resource (id ``default_resource_id(vendor_id)``).
    ``terms`` (engine.payments.terms.PaymentTerms) carries the payment terms; given, it
    decides ``payment_required`` and is checked complete."""
    from engine.payments.terms import PaymentTerms, check_terms

    _check_name("vendorId", vendor_id)
    terms = check_terms(terms, complete=True) if terms is not None else \
        PaymentTerms(payment_required=payment_required)
    payment_required = terms.payment_required
    _check_grid(vendor_id, unit_minutes, buffer_before_minutes, buffer_after_minutes)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"unknown time zone {timezone!r}",
                              details={"field": "timezone"}) from None
    async with conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO vendors (id, unit_minutes, buffer_before_minutes,
                       buffer_after_minutes, confirmation_required, payment_required, timezone,
                       price_amount, deposit_amount, currency, stripe_account_id,
                       refund_policy, refund_cutoff_minutes)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                   RETURNING {columns(Vendor)}""",
                vendor_id, unit_minutes, buffer_before_minutes, buffer_after_minutes,
                confirmation_required, payment_required, timezone, terms.price_amount,
                terms.deposit_amount, terms.currency, terms.stripe_account_id,
                terms.refund_policy, terms.refund_cutoff_minutes)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"vendor {vendor_id!r} already exists",
                                details={"vendorId": vendor_id}) from None
        await create_resource(conn, default_resource_id(vendor_id), vendor_id)
    return Vendor(**row)


async def get_vendor(conn: asyncpg.Connection, vendor_id: str) -> Vendor:
    row = await conn.fetchrow(f"SELECT {columns(Vendor)} FROM vendors WHERE id = $1",
                              vendor_id)
    if row is None:
        raise UnknownVendor(f"unknown vendor {vendor_id!r}", details={"vendorId": vendor_id})
    return Vendor(**row)


async def update_vendor_terms(conn: asyncpg.Connection, vendor_id: str,
                              changes: dict) -> Vendor:
    """Change a vendor's payment terms (issue 12): ``changes`` maps PaymentTerms field names
    to new values (None clears an optional one). The merged terms are checked complete
    before the write; the row is locked meanwhile."""
    import dataclasses

    from engine.payments.terms import check_terms

    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {columns(Vendor)} FROM vendors WHERE id = $1 FOR UPDATE", vendor_id)
        if row is None:
            raise UnknownVendor(f"unknown vendor {vendor_id!r}",
                                details={"vendorId": vendor_id})
        merged = dataclasses.replace(Vendor(**row).terms, **changes)
        if changes.get("refund_policy") not in (None, "full_before") \
                and "refund_cutoff_minutes" not in changes:
            merged = dataclasses.replace(merged, refund_cutoff_minutes=None)
        terms = check_terms(merged, complete=True)
        row = await conn.fetchrow(
            f"""UPDATE vendors SET payment_required = $2, price_amount = $3,
                   deposit_amount = $4, currency = $5, stripe_account_id = $6,
                   refund_policy = $7, refund_cutoff_minutes = $8
                WHERE id = $1 RETURNING {columns(Vendor)}""",
            vendor_id, terms.payment_required, terms.price_amount, terms.deposit_amount,
            terms.currency, terms.stripe_account_id, terms.refund_policy,
            terms.refund_cutoff_minutes)
    return Vendor(**row)


async def create_resource(conn: asyncpg.Connection, resource_id: str, vendor_id: str, *,
                          unit_minutes: int | None = None,
                          buffer_before_minutes: int | None = None,
                          buffer_after_minutes: int | None = None,
                          shard_key: str | None = None) -> StoredResource:
    """A resource of a vendor; unit and buffers default to the vendor's. Its shard key is
    the vendor's id (a vendor's resources share one Redis hash tag, so one script can hold
    several of them); ``shard_key`` overrides it (tests of resources created before
    migration 0011, whose key is their own id)."""
    _check_name("resourceId", resource_id)
    if shard_key is not None:
        _check_name("shardKey", shard_key)
    vendor = await get_vendor(conn, vendor_id)
    unit = vendor.unit_minutes if unit_minutes is None else unit_minutes
    before = vendor.buffer_before_minutes if buffer_before_minutes is None else buffer_before_minutes
    after = vendor.buffer_after_minutes if buffer_after_minutes is None else buffer_after_minutes
    _check_grid(resource_id, unit, before, after)
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO resources (id, vendor_id, unit_minutes, buffer_before_minutes,
                   buffer_after_minutes, shard_key)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING {columns(StoredResource)}""",
            resource_id, vendor_id, unit, before, after, shard_key or vendor_id)
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"resource {resource_id!r} already exists",
                            details={"resourceId": resource_id}) from None
    except asyncpg.ForeignKeyViolationError:  # the vendor vanished since get_vendor
        raise UnknownVendor(f"unknown vendor {vendor_id!r}",
                            details={"vendorId": vendor_id}) from None
    return StoredResource(**row)


async def get_resource(conn: asyncpg.Connection, resource_id: str) -> StoredResource:
    row = await conn.fetchrow(
        f"SELECT {columns(StoredResource)} FROM resources WHERE id = $1", resource_id)
    if row is None:
        raise UnknownResource(f"unknown resource {resource_id!r}",
                              details={"resourceId": resource_id})
    return StoredResource(**row)


async def list_resources(conn: asyncpg.Connection,
                         vendor_id: str | None = None) -> list[StoredResource]:
    rows = await conn.fetch(
        f"""SELECT {columns(StoredResource)} FROM resources
            WHERE $1::text IS NULL OR vendor_id = $1 ORDER BY key""",
        vendor_id)
    return [StoredResource(**row) for row in rows]


async def list_vendors(conn: asyncpg.Connection) -> list[Vendor]:
    rows = await conn.fetch(f"SELECT {columns(Vendor)} FROM vendors ORDER BY id")
    return [Vendor(**row) for row in rows]


async def load_catalog(conn: asyncpg.Connection) -> ResourceCatalog:
    """Every vendor and resource as the engine's catalog (API and workers fill theirs)."""
    return ResourceCatalog([r.to_engine() for r in await list_resources(conn)],
                           [v.to_engine() for v in await list_vendors(conn)])


# ---- API keys ---------------------------------------------------------------------------
async def insert_api_key(conn: asyncpg.Connection, *, key_id: str, prefix: str, digest: str,
                         role: str, partner_id: str | None = None,
                         vendor_id: str | None = None) -> ApiKey:
    """Store a key by its public prefix and digest; the caller hashes, plaintext never lands."""
    _check_name("keyId", key_id)
    _check_name("prefix", prefix)
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}",
                              details={"field": "role", "allowed": list(ROLES)})
    if len(digest) < MIN_DIGEST_CHARS:
        raise ValidationError("digest is too short to be a key digest",
                              details={"field": "digest"})
    if role == "partner" and partner_id is None:
        raise ValidationError("a partner key needs a partner", details={"field": "partnerId"})
    if role == "vendor" and vendor_id is None:
        raise ValidationError("a vendor key needs a vendor", details={"field": "vendorId"})
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO api_keys (id, prefix, digest, role, partner_id, vendor_id)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING {columns(ApiKey)}""",
            key_id, prefix, digest, role, partner_id, vendor_id)
    except asyncpg.UniqueViolationError as exc:
        field = "prefix" if "prefix" in (exc.constraint_name or "") else "keyId"
        raise AlreadyExists(f"an API key with this {field} already exists",
                            details={"field": field}) from None
    except asyncpg.ForeignKeyViolationError as exc:
        if "partner" in (exc.constraint_name or ""):
            raise UnknownPartner(f"unknown partner {partner_id!r}",
                                 details={"partnerId": partner_id}) from None
        raise UnknownVendor(f"unknown vendor {vendor_id!r}",
                            details={"vendorId": vendor_id}) from None
    return ApiKey(**row)


async def find_api_key(conn: asyncpg.Connection, prefix: str) -> ApiKey | None:
    """The key with this prefix, revoked or not (the caller refuses revoked keys)."""
    row = await conn.fetchrow(f"SELECT {columns(ApiKey)} FROM api_keys WHERE prefix = $1",
                              prefix)
    return None if row is None else ApiKey(**row)


async def revoke_api_key(conn: asyncpg.Connection, key_id: str) -> ApiKey:
    """Idempotent: revoking a revoked key keeps its first ``revoked_at``."""
    row = await conn.fetchrow(
        f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
            WHERE id = $1 RETURNING {columns(ApiKey)}""", key_id)
    if row is None:
        raise NotFound(f"unknown API key {key_id!r}", details={"keyId": key_id})
    return ApiKey(**row)


# ---- validation -------------------------------------------------------------------------
def _check_name(field: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(f"{field} {value!r} is not a valid name: letters, digits, "
                              "'_', '.', '-', at most 64", details={"field": field})


def _check_grid(owner_id: str, unit_minutes: int, before_minutes: int,
                after_minutes: int) -> None:
    """The same rules the hold engine enforces on its units, checked before any write."""
    for field, value in (("unitMinutes", unit_minutes), ("bufferBeforeMinutes", before_minutes),
                         ("bufferAfterMinutes", after_minutes)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{field} must be an integer", details={"field": field})
    Resource(owner_id, unit_ms=unit_minutes * MINUTE_MS,
             buffer_before_ms=before_minutes * MINUTE_MS,
             buffer_after_ms=after_minutes * MINUTE_MS)
