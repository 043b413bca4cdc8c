"""tests/test_lifecycle.py, every test, on the local Redis Cluster (fixtures: conftest here)."""

from tests.test_lifecycle import *  # noqa: F401,F403
