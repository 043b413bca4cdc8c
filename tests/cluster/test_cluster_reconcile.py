"""tests/test_reconcile.py, every test, on the local Redis Cluster (fixtures: conftest here)."""

from tests.test_reconcile import *  # noqa: F401,F403
