"""Issue 17: the reservation's ETag is its version; If-Match takes it, If-None-Match 304s."""

from __future__ import annotations

from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings,
    app,
    client,
    create_body,
    migrated,
    world,
)


async def test_etag_matches_if_match_and_if_none_match(client, world):
    r = await client.post("/v1/reservations", json=create_body("v-confirm"),
                          headers=world.auth("p1"))
    rid = r.json()["reservationId"]
    got = await client.get(f"/v1/reservations/{rid}", headers=world.auth("p1"))
    version = got.json()["version"]
    assert got.headers["etag"] == f'"{version}"'

    same = await client.get(f"/v1/reservations/{rid}",
                            headers={**world.auth("p1"), "If-None-Match": got.headers["etag"]})
    assert same.status_code == 304 and same.content == b""
    assert same.headers["etag"] == got.headers["etag"]
    star = await client.get(f"/v1/reservations/{rid}",
                            headers={**world.auth("p1"), "If-None-Match": "*"})
    assert star.status_code == 304
    other = await client.get(f"/v1/reservations/{rid}",
                             headers={**world.auth("p1"), "If-None-Match": '"999", W/"998"'})
    assert other.status_code == 200 and other.json()["version"] == version

    # The ETag as If-Match: the vendor acts on exactly the version it read.
    confirmed = await client.post(f"/v1/reservations/{rid}/vendor-confirmation",
                                  headers={**world.auth("vendor"),
                                           "If-Match": got.headers["etag"]})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.headers["etag"] == f'"{confirmed.json()["version"]}"'
    assert confirmed.json()["version"] > version
    # The old ETag is stale now: 412 for If-Match, 200 with the new one for If-None-Match.
    stale = await client.post(f"/v1/reservations/{rid}/cancel",
                              headers={**world.auth("p1"), "If-Match": got.headers["etag"]})
    assert stale.status_code == 412 and stale.json()["error"]["code"] == "VERSION_MISMATCH"
    fresh = await client.get(f"/v1/reservations/{rid}",
                             headers={**world.auth("p1"), "If-None-Match": got.headers["etag"]})
    assert fresh.status_code == 200 and fresh.headers["etag"] == confirmed.headers["etag"]
    # Another tenant learns nothing from a conditional GET either.
    hidden = await client.get(f"/v1/reservations/{rid}",
                              headers={**world.auth("p2"), "If-None-Match": "*"})
    assert hidden.status_code == 404
