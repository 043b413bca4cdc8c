"""The OpenAPI of issue 17's additions, merged into api/openapi.py's paths: the lists with
cursors (beside the POSTs already documented on the same paths) and the reservation ETag."""

from __future__ import annotations

from typing import Any

from api.schemas import NAME_DOC, TIME_DOC
from engine.lifecycle import State
from engine.list_service import DEFAULT_LIMIT, MAX_LIMIT
from engine.permissions import ROLES

NAME = {"type": "string", **NAME_DOC}
TIME = {"type": "string", **TIME_DOC}
STATES = [s.value for s in State]
STATE_LIST = {"type": "string", "minLength": 1,
              "pattern": "^(" + "|".join(STATES) + ")(,(" + "|".join(STATES) + "))*$",
              "description": "one state, or several separated by commas"}
CURSOR_DOC = ("the nextCursor of the previous page (opaque; made under the same filters, "
              "else 400 INVALID_CURSOR)")
LIST_NOTE = (" Newest first by creation, keyset-paged: paging while rows are added shows no "
             "row twice and skips none that existed when paging began. Read from Postgres "
             "(the commit queue's read model): a reservation is listed once the worker has "
             "written it, with the state it last wrote. Unknown or repeated parameters, a "
             "limit outside 1..200, a bad time, state or cursor: 400.")


def _page_params(extra: list[dict]) -> list[dict]:
    from api.openapi import param

    return [*extra,
            param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                     "default": DEFAULT_LIMIT}),
            param("startingAfter", "query", {"type": "string", "minLength": 1,
                                             "maxLength": 512,
                                             "pattern": "^[A-Za-z0-9_-]+$"},
                  description=CURSOR_DOC)]


def add_paths(paths: dict[str, Any]) -> None:
    from api.openapi import operation, ok, param

    window = [param("from", "query", TIME, description="slots starting at or after this"),
              param("to", "query", TIME, description="slots starting before this")]
    paths.setdefault("/v1/reservations", {})["get"] = operation(
        "list_reservations",
        "Reservations: a partner's own, a vendor's, or all (ops, admin)." + LIST_NOTE,
        {200: ok(200, "ReservationList")}, errors=[400, 403, 404],
        parameters=_page_params([
            param("state", "query", STATE_LIST),
            param("vendorId", "query", NAME,
                  description="a vendor key may name only its own vendor (else 404)"),
            *window]))
    paths.setdefault("/v1/bookings", {})["get"] = operation(
        "list_bookings", "Bookings (committed reservations), with the same tenancy as "
                         "reservations." + LIST_NOTE,
        {200: ok(200, "BookingList")}, errors=[400, 403, 404],
        parameters=_page_params([param("vendorId", "query", NAME), *window]))
    directory = " Ordered by id (role admin). Unknown parameters, a limit outside 1..200 or a " \
                "bad cursor: 400."
    paths.setdefault("/v1/admin/vendors", {})["get"] = operation(
        "admin_list_vendors", "Vendors." + directory, {200: ok(200, "VendorList")},
        errors=[400, 403], parameters=_page_params([]))
    paths.setdefault("/v1/admin/partners", {})["get"] = operation(
        "admin_list_partners", "Partners." + directory, {200: ok(200, "PartnerList")},
        errors=[400, 403], parameters=_page_params([]))
    paths.setdefault("/v1/admin/keys", {})["get"] = operation(
        "admin_list_keys", "API keys by id and prefix, never a secret." + directory,
        {200: ok(200, "ApiKeyList")}, errors=[400, 403],
        parameters=_page_params([
            param("role", "query", {"type": "string", "enum": list(ROLES)}),
            param("partnerId", "query", NAME), param("vendorId", "query", NAME)]))
    audit = paths["/v1/ops/audit"]["get"]
    audit["summary"] = ("Audit log entries, oldest first (roles ops, admin); page with "
                        "startingAfter=nextCursor")
    audit["parameters"].append(param("startingAfter", "query",
                                     {"type": "string", "minLength": 1, "maxLength": 512,
                                      "pattern": "^[A-Za-z0-9_-]+$"}, description=CURSOR_DOC))


ETAG = {"ETag": {"description": 'the reservation\'s version, quoted ("3"): send it as '
                                 "If-Match to act only on this version (else 412), or as "
                                 "If-None-Match to be answered 304 while it is current",
                  "schema": {"type": "string", "pattern": '^"[0-9]+"$'}}}


def add_etags(paths: dict[str, Any]) -> None:
    """ETag on every answer that shows one reservation; If-None-Match (304) on its GET."""
    from api.openapi import param

    for path, item in paths.items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith("2") and schema == {"$ref":
                                                         "#/components/schemas/Reservation"}:
                    response.setdefault("headers", {}).update(ETAG)
    get = paths["/v1/reservations/{reservationId}"]["get"]
    get["parameters"].append(param(
        "If-None-Match", "header", {"type": "string", "maxLength": 256},
        description='an ETag seen before ("3"), or *: 304 while the reservation is at '
                    "that version"))
    get["responses"]["304"] = {"description": "Not modified: the version named in "
                                              "If-None-Match is current (no body)",
                               "headers": ETAG}
