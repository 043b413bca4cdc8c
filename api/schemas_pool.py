"""Request and response shapes of resource groups (issue 16, pool), as msgspec Structs.

The OpenAPI components come from these (api/openapi.py adds ``REQUESTS`` and ``RESPONSES``
to the core's). Strategy-specific fields: ``preferredOrder`` (strategy ``preferred``: the
members tried first, in order) and ``anchorResourceId`` (strategy ``adjacent``: the member
the choice starts next to, along the group's order; a pooled create's ``nearResourceId``
overrides it per hold) and ``zones`` (strategy ``adjacent``: named lists of members, e.g. a
floor; a pooled create's ``nearZone`` takes a member of that zone first, else the nearest).
"""

from typing import Annotated

from msgspec import UNSET, Meta, UnsetType

from api.schemas import Body, Name, Out, OutTime, doc
from engine.pool import STRATEGIES

Strategy = doc(str, enum=list(STRATEGIES))
# Enforced at decode: the length bound. Documented (the service answers EMPTY_GROUP and
# DUPLICATE_MEMBER): at least one, each once.
Members = Annotated[list[Name], Meta(max_length=1000, extra_json_schema={"uniqueItems": True})]
NonEmptyMembers = Annotated[list[Name], Meta(max_length=1000, extra_json_schema={
    "uniqueItems": True, "minItems": 1})]


class CreateResourceGroupRequest(Body):
    group_id: Name
    resource_ids: NonEmptyMembers
    strategy: Strategy
    preferred_order: Members | UnsetType = UNSET
    anchor_resource_id: Name | UnsetType = UNSET
    zones: dict[Name, NonEmptyMembers] | UnsetType = UNSET


class UpdateResourceGroupRequest(Body):
    """PATCH: the fields given replace the group's; the result is validated whole."""

    resource_ids: NonEmptyMembers | UnsetType = UNSET
    strategy: Strategy | UnsetType = UNSET
    preferred_order: Members | UnsetType = UNSET
    anchor_resource_id: Name | UnsetType = UNSET
    zones: dict[Name, NonEmptyMembers] | UnsetType = UNSET


class ResourceGroup(Out):
    vendor_id: str
    group_id: str
    resource_ids: list[str]
    strategy: Strategy
    preferred_order: list[str] | UnsetType = UNSET
    anchor_resource_id: str | UnsetType = UNSET
    zones: dict[str, list[str]] | UnsetType = UNSET


class GroupSlot(Out):
    start_time: OutTime
    end_time: OutTime
    free_members: int
    members: int


class GroupAvailability(Out):
    vendor_id: str
    group_id: str
    slots: list[GroupSlot]


REQUESTS = (CreateResourceGroupRequest, UpdateResourceGroupRequest)
RESPONSES = (ResourceGroup, GroupAvailability)
