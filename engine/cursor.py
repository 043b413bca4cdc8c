"""Opaque list cursors (issue 17): ``startingAfter=<cursor>`` / ``nextCursor``.

A cursor is the keyset position of the last row of a page, tagged with the list it belongs
to and a digest of the filters it was made under, packed as unpadded base64url JSON. It is
opaque to clients (its layout may change) and carries no authority: every page is filtered
by the caller's tenancy again, so a forged cursor can only move within what the caller may
see. A cursor that does not decode, belongs to another list or was made under other
filters is refused with 400 ``INVALID_CURSOR`` before any query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from engine.errors import ValidationError

VERSION = 1
MAX_CURSOR_CHARS = 512
FIELD = "startingAfter"


def _digest(filters: Mapping[str, Any]) -> str:
    canonical = orjson.dumps({k: v for k, v in filters.items() if v is not None},
                             option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:12]


def encode(kind: str, position: Sequence[Any], filters: Mapping[str, Any]) -> str:
    raw = orjson.dumps([VERSION, kind, _digest(filters), list(position)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(token: str, kind: str, filters: Mapping[str, Any],
           types: Sequence[type]) -> list[Any]:
    """The position ``token`` names, each value of the given ``types``; else 400."""
    if not token or len(token) > MAX_CURSOR_CHARS:
        raise invalid("the cursor is empty or too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, cursor_kind, digest, position = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise invalid("the cursor is not one this API issued") from None
    if version != VERSION or cursor_kind != kind:
        raise invalid("the cursor belongs to another list")
    if digest != _digest(filters):
        raise invalid("the cursor was issued for other filters; keep the filters of the "
                       "first page when paging")
    if (not isinstance(position, list) or len(position) != len(types)
            or not all(type(value) is t for value, t in zip(position, types))):
        raise invalid("the cursor is not one this API issued")
    return position


def invalid(message: str) -> ValidationError:
    return ValidationError(message, code="INVALID_CURSOR", details={"field": FIELD})
