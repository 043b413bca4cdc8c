"""tests/test_worker.py on the local Redis Cluster (fixtures: conftest here): real worker
processes (cluster mode, arq on its own Redis) drain every shard's stream wherever its slot
lives. Left out: the two tests that restart a private single Redis without its data (a
cluster loses a master differently: tests/cluster/test_cluster_failover.py kills one and
promotes its replica)."""

from tests.test_worker import *  # noqa: F401,F403

del test_redis_restart_without_data_is_rehydrated_before_new_holds  # noqa: F821
del test_a_booking_landing_after_a_rehydration_keeps_its_markers  # noqa: F821
