"""tests/test_contention.py on the local Redis Cluster: several processes contend through
cluster clients; the whole history is checked."""

from tests.test_contention import *  # noqa: F401,F403

del contention_target  # noqa: F821  (the cluster conftest names the Redis)
