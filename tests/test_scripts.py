"""The Lua scripts as files: headers, hash slots, includes, and the NOSCRIPT fallback."""

from __future__ import annotations

import asyncio
import re

import pytest
from redis.crc import key_slot

from engine.keys import KeySpace
from engine.scripts import ScriptError, expand, scripts

# How the engine builds each script's KEYS, from one resource/reservation/partner. Every
# script must be listed: a new script without an entry fails test_every_script_is_listed.
RESOURCE = "room-42"


def sample_keys(ks: KeySpace) -> dict[str, list[str]]:
    shard = ks.shard_of(RESOURCE)
    rid = ks.new_reservation_id(RESOURCE)
    hid = ks.new_hold_id(RESOURCE)
    wid = ks.new_waitlist_entry_id(RESOURCE)
    return {
        "place_hold": [ks.unit_root(shard), ks.hold(hid), ks.fence(RESOURCE)],
        "release_hold": [ks.unit_root(shard), ks.hold(hid)],
        "extend_hold": [ks.unit_root(shard), ks.hold(hid)],
        "read_hold": [ks.hold(hid)],
        "create_reservation": [ks.unit_root(shard), ks.reservation(rid), ks.history(rid),
                               ks.fence(RESOURCE), ks.events(shard), ks.deadlines(shard),
                               ks.ready(shard), ks.availability_revision(RESOURCE)],
        "transition": [ks.unit_root(shard), ks.reservation(rid), ks.history(rid),
                       ks.events(shard), ks.deadlines(shard)],
        "modify_reservation": [ks.unit_root(shard), ks.reservation(rid), ks.history(rid),
                               ks.events(shard), ks.deadlines(shard), ks.ready(shard)],
        "create_pooled_reservation": [ks.unit_root(shard), ks.reservation(rid),
                                      ks.history(rid), ks.fence_root(shard), ks.events(shard),
                                      ks.deadlines(shard), ks.ready(shard)],  # issue 16
        "create_multi_reservation": [ks.unit_root(shard), ks.reservation(rid), ks.history(rid),
                                     ks.fence_root(shard), ks.events(shard),
                                     ks.deadlines(shard), ks.ready(shard)],  # issue 16
        "reap": [ks.unit_root(shard), ks.events(shard), ks.deadlines(shard)],  # issue 14
        "read_reservation": [ks.reservation(rid), ks.history(rid)],
        "restore_markers": [ks.unit_root(shard)],
        # payments (issue 12): a cancelled booking; its event (issue 14)
        "free_booked": [ks.unit_root(shard), ks.reservation(rid), ks.history(rid),
                        ks.events(shard)],
        "read_units": [ks.unit_root(shard), ks.availability_revision(RESOURCE)],
        "availability_publish": [ks.availability_revision(RESOURCE)],
        "availability_flag": [ks.reservation(rid)],
        "raise_fence": [ks.fence(RESOURCE)],  # issue 15
        "release_unit": [ks.unit(RESOURCE, 123)],
        "rate_limit": [ks.partner_rate("p1")],
        "cap_acquire": [ks.partner_holds("p1"), ks.partner_reputation("p1")],
        "cap_touch": [ks.partner_holds("p1")],
        "cap_release": [ks.partner_holds("p1"), ks.partner_reputation("p1")],
        "partner_usage": [ks.partner_holds("p1"), ks.partner_reputation("p1")],
        "idempotency_begin": [ks.idempotency("p1", "key-1")],
        "idempotency_complete": [ks.idempotency("p1", "key-1"), ks.idempotency_refused("p1")],
        "idempotency_abandon": [ks.idempotency("p1", "key-1")],
        # hold transfer and waitlist (issue 16)
        "transfer_offer": [ks.reservation(rid), ks.transfer_offer(rid)],
        "transfer_accept": [ks.reservation(rid), ks.history(rid), ks.transfer_offer(rid),
                            ks.events(shard)],
        "waitlist_add": [ks.unit_root(shard), ks.waitlist_entry(wid),
                         ks.waitlist_index(RESOURCE, shard), ks.waitlist_queue(RESOURCE, 10, 12, shard),
                         ks.waitlist_sequence(shard), ks.events(shard), ks.deadlines(shard)],
        "waitlist_withdraw": [ks.waitlist_entry(wid), ks.waitlist_index(RESOURCE, shard),
                              ks.waitlist_queue(RESOURCE, 10, 12, shard)],
        "waitlist_read": [ks.waitlist_entry(wid)],
        "cap_waitlist": [ks.partner_holds("p1"), ks.partner_reputation("p1")],
    }


def test_every_script_is_listed():
    assert set(scripts()) == set(sample_keys(KeySpace("x:", 16)))


@pytest.mark.parametrize("prefix", ["", "tenant-a:"])
@pytest.mark.parametrize("shards", [1, 16, 1024])
def test_every_scripts_keys_share_one_hash_slot(prefix, shards):
    ks = KeySpace(prefix, shards)
    for name, script_keys in sample_keys(ks).items():
        assert len(script_keys) == len(scripts()[name].keys), name
        slots = {key_slot(k.encode()) for k in script_keys}
        assert len(slots) == 1, (name, script_keys)
        # Keys a script derives from the unit root (root + resource + ":" + index) keep
        # the root's tag: the appended part has no brace.
        unit = ks.unit(RESOURCE, 123456)
        assert key_slot(unit.encode()) == key_slot(ks.unit_root(ks.shard_of(RESOURCE)).encode())


def test_every_script_documents_its_keys_and_argv():
    for name, script in scripts().items():
        assert script.summary, name
        body = script.source[len(script.header):]
        used_keys = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
        used_argv = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
        assert used_keys <= set(script.keys), (name, used_keys - set(script.keys))
        assert used_argv <= set(script.argv), (name, used_argv - set(script.argv))
        assert set(script.keys) == set(range(1, len(script.keys) + 1)), name
        assert set(script.argv) == set(range(1, len(script.argv) + 1)), name
        assert "Returns:" in script.header, name
        assert all(script.keys.values()) and all(script.argv.values()), name


def test_includes_expand_once_and_cycles_are_refused():
    files = {
        "a.lua": "--@include lib/x.lua\n--@include lib/y.lua\nreturn 1\n",
        "lib/x.lua": "local function x() end\n",
        "lib/y.lua": "--@include lib/x.lua\nlocal function y() end\n",
        "c.lua": "--@include lib/c1.lua\n",
        "lib/c1.lua": "--@include lib/c2.lua\n",
        "lib/c2.lua": "--@include lib/c1.lua\n",
    }
    source = expand("a.lua", read=files.__getitem__)
    assert source.count("local function x()") == 1
    assert source.index("local function x()") < source.index("local function y()")
    with pytest.raises(ScriptError, match="cycle"):
        expand("c.lua", read=files.__getitem__)


def test_generated_lifecycle_is_included():
    assert "local EDGES = {" in scripts()["transition"].source
    assert "@include" not in scripts()["transition"].source


@pytest.fixture
async def own_redis(tmp_path):
    """A Redis of this test's own: flushing the script cache of the shared one would fail
    every other process's readiness that uses it."""
    import shutil
    import socket
    import subprocess
    import time

    import redis.asyncio as aioredis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                             str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
        yield client
        await client.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_noscript_fallback_after_script_flush(own_redis, keys, catalog, settings):
    """A flushed script cache (restart, failover) costs one EVAL per call, never an error."""
    from benchmarks.holds import HoldEngine
    from engine.access import RedisAccess

    redis = own_redis
    holds = HoldEngine(RedisAccess(redis), keys, catalog, settings)
    await holds.access.load_scripts()
    sha = holds.access.scripts["place_hold"].sha
    assert await redis.script_exists(sha) == [True]
    t0 = 1_893_456_000_000
    first = await holds.place("room-a", t0, t0 + 900_000)
    await redis.script_flush()
    assert not await holds.access.scripts_loaded()
    # Concurrent calls, all coalesced into one batch, each falls back on its own.
    results = await asyncio.gather(*(
        holds.place("room-a", t0 + 900_000 * (i + 1), t0 + 900_000 * (i + 2))
        for i in range(10)))
    assert len({r.hold_id for r in results}) == 10
    assert await holds.read(first.hold_id) == first
    sha = holds.access.scripts["place_hold"].sha
    assert await redis.script_exists(sha) == [True]  # the fallback cached it again
    await holds.access.close()


async def test_pipeline_fallback_path_and_its_noscript_handling(own_redis, keys, catalog,
                                                               settings):
    """Where the raw connection cannot be used (unix sockets), redis-py pipelines carry the
    same batches with the same per-call replies and NOSCRIPT fallback."""
    from engine.access import RedisAccess
    from engine.errors import HoldConflict
    from benchmarks.holds import HoldEngine

    redis = own_redis
    access = RedisAccess(redis, raw=False)
    assert access.wire is None
    engine = HoldEngine(access, keys, catalog, settings)
    t0 = 1_893_456_000_000
    await redis.script_flush()
    results = await asyncio.gather(
        *(engine.place("room-a", t0, t0 + 900_000) for _ in range(10)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, HoldConflict) for r in results if isinstance(r, Exception))
    assert await engine.read(winners[0].hold_id) == winners[0]


def test_scripts_name_their_result_codes():
    """Every reply code is a name from engine/errors.py (``@outcomes``), never a number."""
    from pathlib import Path

    bare = re.compile(r"return\s*\{\s*-?\d")
    for path in sorted((Path(__file__).parents[1] / "lua").glob("*.lua")):
        body = path.read_text().split("]]", 1)[1]
        assert not bare.search(body), path
    assert "local OUTCOME = {" in scripts()["transition"].source
    assert "CONFLICT = -1," in scripts()["create_reservation"].source


def test_every_outcome_has_its_error():
    from engine.errors import ERRORS, Outcome

    assert set(ERRORS) == set(Outcome) - {Outcome.OK}
