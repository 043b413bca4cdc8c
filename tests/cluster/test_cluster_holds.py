"""tests/test_holds.py, every test, on the local Redis Cluster (fixtures: conftest here)."""

from tests.test_holds import *  # noqa: F401,F403
