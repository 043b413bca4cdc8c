"""tests/test_api_reservations.py, every test, on the local Redis Cluster (fixtures: conftest here)."""

from tests.test_api_reservations import *  # noqa: F401,F403
