"""The access layer on a real Redis Cluster: routing per node, MOVED and ASK while a slot is
resharded (mid-batch too, live keys moving under batches in flight), NOSCRIPT, a master killed and its replica promoted, and the
refusals (a server that is not a cluster, a cluster without cluster mode, a node that
refuses, a database number)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from benchmarks.holds import HoldEngine
from engine import runtime as runtime_module
from engine.access import RedisAccess
from engine.errors import HoldConflict, UnsafeRedis
from engine.keys import KeySpace
from engine.resources import Resource, ResourceCatalog
from engine.resp_cluster import ClusterWire
from engine.runtime import Runtime, preflight_or_message
from engine.settings import Settings, SettingsError
from slotguard.local_cluster import LocalCluster
from tests.conftest import REDIS_URL
from tests.timing import eventually

T0 = 1_893_456_000_000
M = 60_000
UNIT = 15 * M


def slot_of_shard(keys: KeySpace, shard: int) -> int:
    return key_slot(keys.events(shard).encode())


async def on_node(cluster: LocalCluster, node, key: str):
    """GET straight from one node (a plain client: a key not there answers MOVED)."""
    client = aioredis.Redis(host="127.0.0.1", port=node.port, decode_responses=True)
    try:
        return await client.get(key)
    finally:
        await client.aclose()


async def test_batches_are_routed_per_node(access, keys, catalog, settings, redis_cluster):
    assert isinstance(access.wire, ClusterWire)
    holds = HoldEngine(access, keys, catalog, settings)
    resources = ["room-a", "room-b", "suite-1"]
    # One coalesced batch of calls spanning the shards of three resources.
    placed = await asyncio.gather(*(
        holds.place(resources[i % 3], T0 + i * 24 * 60 * M,
                    T0 + i * 24 * 60 * M + 24 * 60 * M if resources[i % 3] == "suite-1"
                    else T0 + i * 24 * 60 * M + 30 * M) for i in range(12)))
    owners = set()
    for hold in placed:
        key = keys.unit(hold.resource_id, hold.first_unit)
        node = redis_cluster.node_of_slot(key_slot(key.encode()))
        assert await on_node(redis_cluster, node, key) == hold.hold_id
        owners.add(node.port)
    shards = {keys.shard_of(r) for r in resources}
    masters = {redis_cluster.node_of_slot(slot_of_shard(keys, s)).port for s in shards}
    assert owners == masters
    # The wire opened one connection per master it wrote to, no more.
    assert len(access.wire._nodes) == len(masters)


async def test_settings_refuse_a_database_number_in_cluster_mode():
    with pytest.raises(SettingsError, match="seed node"):
        Settings.from_env({}, redis_url="redis://127.0.0.1:7000/3", redis_cluster=True)
    Settings.from_env({}, redis_url="redis://127.0.0.1:7000", redis_cluster=True)


async def test_a_server_that_is_not_a_cluster_is_refused(settings):
    plain = settings.replace(redis_url=REDIS_URL)  # the shared single Redis
    with pytest.raises(UnsafeRedis, match="is not a Redis Cluster"):
        await Runtime.open(plain)
    assert "is not a Redis Cluster" in await asyncio.to_thread(preflight_or_message, plain)


async def test_a_cluster_node_without_cluster_mode_is_refused(settings):
    single = settings.replace(redis_cluster=False)
    with pytest.raises(UnsafeRedis, match="SLOTGUARD_REDIS_CLUSTER=true"):
        await Runtime.open(single)


def test_a_node_that_refuses_is_one_clear_line(settings, monkeypatch):
    monkeypatch.setattr(runtime_module, "PREFLIGHT_WAIT_S", 0.5)
    closed = settings.replace(redis_url="redis://127.0.0.1:1")
    message = preflight_or_message(closed)
    assert message is not None and "does not answer" in message and "\n" not in message


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_refuse_a_server_that_is_not_a_cluster(command, settings):
    env = dict(os.environ, REDIS_URL=REDIS_URL, SLOTGUARD_REDIS_CLUSTER="true",
               SLOTGUARD_ARQ_REDIS_URL=REDIS_URL, DATABASE_URL=settings.database_url,
               SLOTGUARD_KEY_PREFIX=settings.key_prefix)
    result = subprocess.run([sys.executable, "-m", "slotguard", command], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    # One refusal line (an informational "servers: ..." line may precede it).
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is not a Redis Cluster" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_worker_refuses_cluster_mode_without_an_arq_redis(settings, redis_cluster):
    env = dict(os.environ, REDIS_URL=redis_cluster.seed_url, SLOTGUARD_REDIS_CLUSTER="true",
               DATABASE_URL=settings.database_url, SLOTGUARD_KEY_PREFIX=settings.key_prefix)
    env.pop("SLOTGUARD_ARQ_REDIS_URL", None)
    result = subprocess.run([sys.executable, "-m", "slotguard", "worker"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "SLOTGUARD_ARQ_REDIS_URL" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


async def test_noscript_on_a_master_is_answered_by_eval(access, keys, catalog, settings,
                                                        redis_cluster):
    holds = HoldEngine(access, keys, catalog, settings)
    first = await holds.place("room-a", T0, T0 + 30 * M)
    node = redis_cluster.node_of_slot(key_slot(keys.unit("room-a", 0).encode()))
    client = aioredis.Redis(host="127.0.0.1", port=node.port)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    second = await holds.place("room-a", T0 + 30 * M, T0 + 60 * M)
    assert await holds.read(first.hold_id) == first
    assert await holds.read(second.hold_id) == second


# ---- topology changes: a private cluster per test ------------------------------------


async def cluster_access(cluster: LocalCluster):
    client = RedisCluster.from_url(cluster.seed_url, decode_responses=True)
    await client.initialize()
    return client, RedisAccess(client, wait_replicas=1)


async def test_moved_after_resharding_is_followed_and_nothing_is_written_twice(
        own_cluster, catalog, prefix):
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, catalog, settings)
        before = await holds.place("room-a", T0, T0 + 30 * M)
        slot = key_slot(keys.unit("room-a", 0).encode())
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.master_nodes() if n is not source)
        assert await asyncio.to_thread(cluster.move_slot, slot, target) > 0
        # The access layer's slot map is stale: MOVED, followed, then the map refreshed.
        assert await holds.read(before.hold_id) == before
        assert access.wire.redirects >= 1
        with pytest.raises(HoldConflict):
            await holds.place("room-a", T0 + 15 * M, T0 + 45 * M)
        after = await holds.place("room-a", T0 + 30 * M, T0 + 60 * M)
        assert await on_node(cluster, target, keys.unit("room-a", after.first_unit)) \
            == after.hold_id
    finally:
        await access.close()
        await client.aclose()


async def test_a_slot_map_changing_mid_batch(own_cluster, catalog, prefix):
    """Calls in flight while their slot moves: each lands exactly once (MOVED/ASK are
    refusals, re-sent; nothing that may have run is re-sent), none is lost."""
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, catalog, settings)
        slot = key_slot(keys.unit("room-a", 0).encode())
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.master_nodes() if n is not source)

        async def place_many(offset: int, n: int):
            return await asyncio.gather(
                *(holds.place("room-a", T0 + (offset + i) * 2 * UNIT,
                              T0 + (offset + i) * 2 * UNIT + UNIT) for i in range(n)),
                return_exceptions=True)

        first = await place_many(0, 50)
        # Half migrated: keys of the first wave moved, the slot still MIGRATING. A call
        # answers ASK at the source, then TRYAGAIN at the target (a multi-key script while
        # the slot moves, Redis's rule): refused, not run, asked again until the move ends.
        access.wire.retry_window_s = 60.0
        await asyncio.to_thread(cluster.begin_move, slot, target)
        await asyncio.to_thread(cluster.migrate_keys, slot, source, target)
        during = asyncio.create_task(place_many(50, 50))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.end_move, slot, target)
        results = [*first, *await during, *await place_many(100, 50)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert access.wire.redirects >= 1
        # Every hold exactly once, on the target, readable; a second try conflicts with it.
        for hold in results:
            assert await on_node(cluster, target, keys.unit("room-a", hold.first_unit)) \
                == hold.hold_id
            assert await holds.read(hold.hold_id) == hold
        with pytest.raises(HoldConflict):
            await holds.place("room-a", T0, T0 + UNIT)
    finally:
        await access.close()
        await client.aclose()


async def test_a_slot_resharded_with_live_keys_while_batches_are_in_flight(
        own_cluster, catalog, prefix):
    """A slot with hundreds of live keys moved (IMPORTING/MIGRATING, MIGRATE 100 keys at a
    time, SETSLOT NODE: what ``redis-cli --cluster reshard`` does) while waves of
    placements and reads on it keep the wire busy. Whatever interleaving happened: every
    placement answered once, every hold is on the target and readable, and the resource's
    fencing counter advanced exactly once per placement (a script that ran twice would
    have advanced it twice)."""
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, catalog, settings)
        access.wire.retry_window_s = 120.0  # refusals (TRYAGAIN) are asked again until done
        slot = key_slot(keys.unit("room-a", 0).encode())
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.master_nodes() if n is not source)
        counter = iter(range(10**6))

        async def wave(n: int) -> list:
            starts = [T0 + next(counter) * 2 * UNIT for _ in range(n)]
            return await asyncio.gather(*(holds.place("room-a", s, s + UNIT) for s in starts),
                                        return_exceptions=True)

        results = [r for _ in range(10) for r in await wave(30)]  # 300 holds, ~600 keys
        placed_before = [r for r in results if not isinstance(r, BaseException)]
        moving = asyncio.create_task(asyncio.to_thread(cluster.move_slot, slot, target))
        waves = 0
        while not moving.done() or waves < 3:
            results += await wave(20)
            reread = await asyncio.gather(*(holds.read(h.hold_id) for h in placed_before[::15]))
            assert reread == placed_before[::15]
            waves += 1
        assert await moving > 0
        results += await wave(20)  # after the move: the stale map answers MOVED
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert access.wire.redirects >= 1
        tokens = sorted(h.fence_token for h in results)
        assert len(set(h.hold_id for h in results)) == len(results)
        assert tokens == list(range(tokens[0], tokens[0] + len(results)))
        assert int(await on_node(cluster, target, keys.fence("room-a"))) == tokens[-1]
        with pytest.raises(aioredis.ResponseError, match="MOVED"):  # the slot left it
            await on_node(cluster, source, keys.fence("room-a"))
        for hold in results:
            assert await on_node(cluster, target, keys.unit("room-a", hold.first_unit)) \
                == hold.hold_id
            assert await holds.read(hold.hold_id) == hold
    finally:
        await access.close()
        await client.aclose()


async def test_a_stalled_node_holds_back_only_its_own_batches(own_cluster, prefix):
    """The in-flight cap is per node: with one master paused (CLIENT PAUSE WRITE, lifted
    only at the end) and its two batches stuck on the wire, placements on another master are
    answered; the paused node's calls all land once it is unpaused."""
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    resources = [Resource(f"r{i}", unit_ms=UNIT) for i in range(24)]
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, ResourceCatalog(resources), settings)
        await holds.place("r0", T0, T0 + UNIT)  # the wire learns the slot map
        node_of = {r.id: cluster.node_of_slot(key_slot(keys.unit(r.id, 0).encode()))
                   for r in resources}
        stalled, other = "r0", next(r for r, n in node_of.items() if n is not node_of["r0"])
        pause = aioredis.Redis(host="127.0.0.1", port=node_of[stalled].port)
        # WRITE: scripts wait (they may replicate), CLIENT UNPAUSE itself does not.
        await pause.execute_command("CLIENT", "PAUSE", 300_000, "WRITE")
        try:
            stuck = [asyncio.ensure_future(holds.place(stalled, T0 + i * 2 * UNIT,
                                                       T0 + i * 2 * UNIT + UNIT))
                     for i in range(1, 3 * access.batch_max)]
            lane = access.wire.lane(keys.unit(stalled, 0))
            async def stuck_on_the_wire() -> bool:
                return access.inflight().get(lane) == access.max_inflight

            await eventually(stuck_on_the_wire, what="the paused node's batches on the wire")
            # Answered while the paused node's batches are still out (bounded generously;
            # a global cap would hold it until the unpause below, which never comes first).
            placed = await asyncio.wait_for(holds.place(other, T0, T0 + UNIT), 120)
            assert await holds.read(placed.hold_id) == placed
            assert not any(f.done() for f in stuck)
            assert access.inflight().get(lane) == access.max_inflight
        finally:
            await pause.execute_command("CLIENT", "UNPAUSE")
            await pause.aclose()
        landed = await asyncio.gather(*stuck)
        for hold in landed:
            assert await holds.read(hold.hold_id) == hold
        assert len({h.fence_token for h in landed}) == len(landed)
    finally:
        await access.close()
        await client.aclose()


async def test_the_run_id_names_every_master_whatever_redis_py_flags(access):
    """redis-py, on a MOVED naming the node already first for the slot (a command that
    reached another node first), flags that master a replica until its next full refresh.
    The run id (and every per-master call) goes by the slot map instead: it still names
    all three masters, so the watch does not see a change that did not happen."""
    from redis.exceptions import MovedError

    from engine.rehydration import redis_run_id

    redis = access.redis
    await access.load_scripts()
    before = await redis_run_id(access)
    assert before.count("=") == 3
    manager = redis.nodes_manager
    master = manager.get_node_from_slot(0)
    manager._moved_exception = MovedError(f"0 {master.host}:{master.port}")
    manager._update_moved_slots()  # what redis-py runs on that MOVED
    assert master not in redis.get_primaries()  # its flag is wrong now...
    assert manager.get_node_from_slot(0) is master
    assert await redis_run_id(access) == before  # ...the run id is not
    assert await access.scripts_loaded()


async def test_a_refusal_past_the_retry_window_wrote_nothing(own_cluster, catalog, prefix):
    """TRYAGAIN for longer than the window: the call fails with a retryable error, and
    nothing was written (the same placement succeeds once the move ends)."""
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, catalog, settings)
        await holds.place("room-a", T0, T0 + UNIT)
        access.wire.retry_window_s = 0.2
        slot = key_slot(keys.unit("room-a", 0).encode())
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.master_nodes() if n is not source)
        await asyncio.to_thread(cluster.begin_move, slot, target)
        await asyncio.to_thread(cluster.migrate_keys, slot, source, target)
        with pytest.raises(Exception, match="TRYAGAIN"):
            await holds.place("room-a", T0 + 2 * UNIT, T0 + 3 * UNIT)
        await asyncio.to_thread(cluster.end_move, slot, target)
        hold = await holds.place("room-a", T0 + 2 * UNIT, T0 + 3 * UNIT)
        assert await holds.read(hold.hold_id) == hold
    finally:
        await access.close()
        await client.aclose()


async def test_a_master_killed_and_its_replica_promoted(own_cluster, catalog, prefix):
    """Holds acknowledged before the kill survive it (each batch WAITs for the replica);
    the same access layer, never restarted, places and reads after the promotion."""
    cluster = own_cluster()
    settings = Settings.from_env({}, redis_url=cluster.seed_url, redis_cluster=True,
                                 key_prefix=prefix, shards=4)
    keys = KeySpace(prefix, 4)
    client, access = await cluster_access(cluster)
    try:
        holds = HoldEngine(access, keys, catalog, settings)
        placed = await asyncio.gather(*(holds.place("room-a", T0 + i * 2 * UNIT,
                                                    T0 + i * 2 * UNIT + UNIT)
                                        for i in range(40)))
        slot = key_slot(keys.unit("room-a", 0).encode())
        master = cluster.node_of_slot(slot)
        cluster.kill(master)
        promoted = await asyncio.to_thread(cluster.wait_promoted, master, slot, 90)
        assert promoted is not master

        async def placed_again() -> bool:
            try:
                await holds.place("room-a", T0 + 100 * 2 * UNIT, T0 + 100 * 2 * UNIT + UNIT)
            except HoldConflict:
                return True  # an earlier attempt landed
            except Exception:
                return False
            return True

        await eventually(placed_again, timeout_s=60)
        for hold in placed:
            assert await holds.read(hold.hold_id) == hold
            with pytest.raises(HoldConflict):
                await holds.place("room-a", hold.first_unit * UNIT, (hold.last_unit + 1) * UNIT)
    finally:
        await access.close()
        await client.aclose()
