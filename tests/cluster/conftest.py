"""The cluster fixtures: a real local Redis Cluster (3 masters, 3 replicas) for the session.

``redis_cluster`` starts it once per test session (``slotguard.local_cluster.LocalCluster``:
``redis-server --cluster-enabled yes`` on free ports in a private ``tempfile.mkdtemp``
directory, ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``, waits for
``cluster_state:ok``) and kills every node at the end. Tests stay isolated by key prefix,
as on the single Redis.

The fixtures ``settings``, ``redis`` and ``access`` are overridden for every test collected
under this directory, so a test module here that imports the tests of a single-Redis module
runs those same tests against the cluster (cluster mode on, ``REDIS_URL`` a seed node).
A test that breaks the cluster (kills a master) uses ``own_cluster`` instead: a fresh one.
"""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from engine.access import RedisAccess
from engine.settings import Settings
from slotguard.local_cluster import LocalCluster
from tests.conftest import DATABASE_URL, REDIS_URL, delete_prefix


@pytest.fixture(scope="session")
def redis_cluster():
    cluster = LocalCluster(masters=3, replicas=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def cluster_env(monkeypatch):
    """Processes a test starts (workers, the API) inherit cluster mode; arq's cron queue
    lives on the shared single Redis (SLOTGUARD_ARQ_REDIS_URL), under the test's prefix."""
    monkeypatch.setenv("SLOTGUARD_REDIS_CLUSTER", "true")
    monkeypatch.setenv("SLOTGUARD_ARQ_REDIS_URL", REDIS_URL)


@pytest.fixture
def own_cluster():
    """A private 3-master cluster for one test (one that kills or pauses nodes)."""
    clusters = []

    def start(**kwargs) -> LocalCluster:
        cluster = LocalCluster(**{"masters": 3, "replicas": 1, **kwargs}).start()
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def settings(prefix: str, schema: str, redis_cluster: LocalCluster) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_cluster.seed_url,
        redis_cluster=True,
        database_url=DATABASE_URL,
        key_prefix=prefix,
        db_schema=schema,
        shards=4,
        hold_ttl_ms=60_000,
    )


@pytest.fixture
async def redis(prefix: str, redis_cluster: LocalCluster):
    client = RedisCluster.from_url(redis_cluster.seed_url, decode_responses=True)
    await client.initialize()
    yield client
    await delete_prefix(client, prefix)
    await client.aclose()


@pytest.fixture
async def access(redis):
    layer = RedisAccess(redis, wait_replicas=1)
    yield layer
    await layer.close()


@pytest.fixture
def contention_target(redis_cluster: LocalCluster) -> tuple[str, bool]:
    return (redis_cluster.seed_url, True)
