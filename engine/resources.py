"""Resources and their unit grid: the time arithmetic every hold is built on.

A resource cuts time into units (minutes for appointments, nights for rooms). A hold on
``[start, end)`` owns every unit from ``start - buffer_before`` to ``end + buffer_after``;
intervals are half-open, so touching intervals share no unit. Start and end must sit on the
unit grid, and buffers must be whole units, so the unit cover is exact: it never blocks a
unit that the buffered interval does not touch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import UnknownResource, ValidationError
from engine.keys import NAME_RE

MINUTE_MS = 60_000
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    unit_ms: int = 15 * MINUTE_MS
    buffer_before_ms: int = 0
    buffer_after_ms: int = 0
    vendor_id: str = ""
    # The string whose hash picks the resource's shard (engine/keys.py): its own id for
    # resources created before migration 0011 (nothing moved), its vendor's id for newer
    # ones, so a vendor's resources share one hash tag (pooled and multi-resource holds).
    shard_key: str = ""

    @property
    def shard_name(self) -> str:
        """What ``KeySpace.shard_of`` hashes for this resource."""
        return self.shard_key or self.id

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.id):
            raise ValidationError(f"resource id {self.id!r} is not a valid name")
        if self.unit_ms < 1000 or self.unit_ms > DAY_MS or DAY_MS % self.unit_ms:
            raise ValidationError("unit must be between 1 s and 1 day and divide a day")
        for name in ("buffer_before_ms", "buffer_after_ms"):
            value = getattr(self, name)
            if value < 0 or value % self.unit_ms:
                raise ValidationError(f"{name} must be a non-negative multiple of the unit")

    def units(self, start_ms: int, end_ms: int, max_units: int) -> tuple[int, int]:
        """The inclusive unit range ``[first, last]`` a hold of ``[start, end)`` owns."""
        if end_ms <= start_ms:
            raise ValidationError("end must be after start", details={"field": "end"})
        if start_ms % self.unit_ms or end_ms % self.unit_ms:
            raise ValidationError(
                "start and end must sit on the resource's unit grid",
                details={"unitMinutes": self.unit_ms // MINUTE_MS},
            )
        first = (start_ms - self.buffer_before_ms) // self.unit_ms
        last = (end_ms + self.buffer_after_ms) // self.unit_ms - 1
        if last - first + 1 > max_units:
            raise ValidationError(
                "interval covers more units than one hold may",
                details={"maxUnits": max_units, "units": last - first + 1},
            )
        return first, last

    def unit_span_ms(self, first: int, last: int) -> tuple[int, int]:
        """The half-open time range ``[start, end)`` that units ``[first, last]`` cover."""
        return first * self.unit_ms, (last + 1) * self.unit_ms


@dataclass(frozen=True, slots=True)
class Vendor:
    """A vendor's policy. Waived steps are passed through and recorded, never skipped."""

    id: str
    default_resource_id: str
    confirmation_required: bool = True
    payment_required: bool = False
    timezone: str = "UTC"


class ResourceCatalog:
    """The vendors and resources a process knows, by id. The API fills it from Postgres."""

    def __init__(self, resources: list[Resource] | None = None,
                 vendors: list[Vendor] | None = None) -> None:
        self._by_id: dict[str, Resource] = {r.id: r for r in resources or []}
        self._vendors: dict[str, Vendor] = {v.id: v for v in vendors or []}

    def add(self, resource: Resource) -> None:
        self._by_id[resource.id] = resource

    def add_vendor(self, vendor: Vendor) -> None:
        self._vendors[vendor.id] = vendor

    def vendor(self, vendor_id: str) -> Vendor:
        try:
            return self._vendors[vendor_id]
        except KeyError:
            raise UnknownResource(f"unknown vendor {vendor_id!r}", code="UNKNOWN_VENDOR",
                                  details={"vendorId": vendor_id}) from None

    def all_resources(self) -> list[Resource]:
        return list(self._by_id.values())

    def all_vendors(self) -> list[Vendor]:
        return list(self._vendors.values())

    def resources_of(self, vendor_id: str) -> list[Resource]:
        return [r for r in self._by_id.values() if r.vendor_id == vendor_id]

    def get(self, resource_id: str) -> Resource:
        try:
            return self._by_id[resource_id]
        except KeyError:
            raise UnknownResource(f"unknown resource {resource_id!r}",
                                  details={"resourceId": resource_id}) from None

    def __contains__(self, resource_id: str) -> bool:
        return resource_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)
