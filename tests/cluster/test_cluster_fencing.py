"""The paused-worker fencing test of tests/test_fencing.py on the local Redis Cluster."""

from tests.test_fencing import (  # noqa: F401  (fixtures and the test)
    stack,
    test_a_worker_paused_across_a_reclaim_writes_nothing_twice,
    worker_settings,
)
