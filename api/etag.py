"""Entity tags of single resources (issue 17).

A reservation's ETag is its version, quoted: ``ETag: "3"``. The same value is accepted by
``If-Match`` on every action (compare-and-set: a stale one is 412 VERSION_MISMATCH, see
api/validation.py ``parse_if_match``), and by ``If-None-Match`` on the GET (a match, or
``*``, is ``304 Not Modified`` with no body).
"""

from __future__ import annotations

from starlette.responses import Response


def etag(version: int) -> str:
    return f'"{version}"'


def not_modified(if_none_match: str | None, version: int) -> bool:
    """True when ``If-None-Match`` names the current version (weak comparison) or is ``*``."""
    if if_none_match is None:
        return False
    current = etag(version)
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == current:
            return True
    return False


def with_etag(response: Response, version: int) -> Response:
    response.headers["ETag"] = etag(version)
    return response


def not_modified_response(version: int) -> Response:
    return Response(status_code=304, headers={"ETag": etag(version)})
