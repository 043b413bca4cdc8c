"""Vendor payment terms (issue 12): one default everywhere (free), the same names in the
admin API (POST and PATCH) and the CLI, every bad value a typed 400 that changes nothing."""

from __future__ import annotations

import subprocess

import pytest

from engine import directory
from tests.test_api_fixtures import (  # noqa: F401  (fixtures)
    api_settings, app, build_world, client, migrated, row_counts, world)
from tests.test_cli import CLI, cli_env, run  # noqa: F401

PAID = {"paymentRequired": True, "priceAmount": 5_000, "depositAmount": 1_000,
        "currency": "USD"}


async def test_admin_vendor_defaults_free(client, world):
    r = await client.post("/v1/admin/vendors", json={"vendorId": "plain"},
                          headers=world.auth("admin"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["paymentRequired"] is False
    assert body["refundPolicy"] == "full"
    assert body["priceAmount"] is None and body["currency"] is None


async def test_admin_vendor_with_terms_and_patch(client, world, app):
    r = await client.post("/v1/admin/vendors",
                          json={"vendorId": "paid", **PAID, "stripeAccountId": "acct_123abc",
                                "refundPolicy": "full_before", "refundCutoffMinutes": 1440},
                          headers=world.auth("admin"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["priceAmount"], body["depositAmount"], body["currency"]) == (5000, 1000, "usd")
    assert body["refundPolicy"] == "full_before" and body["refundCutoffMinutes"] == 1440
    r = await client.patch("/v1/admin/vendors/paid",
                           json={"refundPolicy": "none", "priceAmount": 7_000},
                           headers=world.auth("admin"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["refundPolicy"] == "none" and body["refundCutoffMinutes"] is None
    assert body["priceAmount"] == 7000
    async with app.state.services.pool.acquire() as conn:
        stored = await directory.get_vendor(conn, "paid")
    assert stored.price_amount == 7000 and stored.refund_policy == "none"
    # The process's catalog follows: free again at once.
    r = await client.patch("/v1/admin/vendors/paid", json={"paymentRequired": False},
                           headers=world.auth("admin"))
    assert r.status_code == 200
    assert (await app.state.services.catalog.vendor("paid")).payment_required is False


@pytest.mark.parametrize("body,field,code", [
    ({**PAID, "priceAmount": 0}, "priceAmount", "INVALID_AMOUNT"),
    ({**PAID, "priceAmount": -5}, "priceAmount", "INVALID_AMOUNT"),
    ({**PAID, "depositAmount": 100_000_000}, "depositAmount", "INVALID_AMOUNT"),
    ({**PAID, "currency": "XXX"}, "currency", "UNKNOWN_CURRENCY"),
    ({**PAID, "stripeAccountId": "bogus"}, "stripeAccountId", "INVALID_FIELD"),
    ({**PAID, "refundPolicy": "sometimes"}, "refundPolicy", "INVALID_FIELD"),
    ({**PAID, "refundPolicy": "full_before"}, "refundCutoffMinutes", "INVALID_FIELD"),
    ({**PAID, "refundCutoffMinutes": 10}, "refundCutoffMinutes", "INVALID_FIELD"),
    ({"paymentRequired": True, "priceAmount": 100, "currency": "usd"}, "depositAmount",
     "MISSING_FIELD"),
])
async def test_admin_vendor_bad_terms_change_nothing(client, world, app, body, field, code):
    pool = app.state.services.pool
    before = await row_counts(pool)
    r = await client.post("/v1/admin/vendors", json={"vendorId": "bad", **body},
                          headers=world.auth("admin"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["details"]["field"] == field
    if code != "INVALID_FIELD" or field != "refundPolicy":
        assert r.json()["error"]["code"] == code
    assert await row_counts(pool) == before
    # The same values by PATCH on an existing vendor change nothing either.
    async with pool.acquire() as conn:
        untouched = await directory.get_vendor(conn, "v-other")
    r = await client.patch("/v1/admin/vendors/v-other", json=body, headers=world.auth("admin"))
    assert r.status_code == 400, r.text
    async with pool.acquire() as conn:
        assert await directory.get_vendor(conn, "v-other") == untouched


async def test_admin_vendor_patch_unknown_and_forbidden(client, world):
    r = await client.patch("/v1/admin/vendors/nobody", json={"priceAmount": 5},
                           headers=world.auth("admin"))
    assert r.status_code == 404
    r = await client.patch("/v1/admin/vendors/v-other", json={"priceAmount": 5},
                           headers=world.auth("p1"))
    assert r.status_code == 403


def test_cli_vendor_payment_flags(cli_env):
    run(cli_env, "migrate")
    out = run(cli_env, "vendors", "create", "--id", "free-one")
    assert "payment waived" in out
    out = run(cli_env, "vendors", "create", "--id", "paid-one", "--payment-required",
              "--price-amount", "2500", "--deposit-amount", "500", "--currency", "eur",
              "--refund-policy", "full_before", "--refund-cutoff-minutes", "60")
    assert "payment required" in out
    bad = subprocess.run([*CLI, "vendors", "create", "--id", "bad-one", "--payment-required",
                          "--price-amount", "0", "--deposit-amount", "5", "--currency", "eur"],
                         env=cli_env, capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "priceAmount" in (bad.stderr + bad.stdout)
    done = subprocess.run(["psql", cli_env["DATABASE_URL"], "-Atc",
                           f'SELECT id, payment_required, price_amount, currency, refund_policy, '
                           f'refund_cutoff_minutes FROM "{cli_env["SLOTGUARD_DB_SCHEMA"]}".vendors '
                           f'ORDER BY id'], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["free-one|f|||full|", "paid-one|t|2500|eur|full_before|60"]
