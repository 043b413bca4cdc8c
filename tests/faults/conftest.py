"""Fixtures of the fault suite: a whole stack of real processes on private servers.

``fault_stack(workers=2, **settings)`` starts a private Redis and Postgres (never the
shared ones), the API and the workers with the given settings (engine/settings.py field
names, e.g. ``reclaim_idle_ms=1000``), and stops everything after the test. The harness
itself lives in :mod:`slotguard.fault_harness` (``slotguard chaos`` runs it too); the
traffic driver in :mod:`slotguard.fault_traffic`, the checker in
:mod:`slotguard.fault_invariants`.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from engine.settings import env_name
from slotguard.fault_harness import FaultStack

# Short forms of the delivery and reclaim settings: a redelivery every second.
SHORT = {"reclaim_idle_ms": 1_000, "drain_block_ms": 100, "max_deliveries": 3,
         "reconcile_interval_s": 5}


@pytest.fixture
async def fault_stack():
    # Not under pytest's tmp_path: another pytest session starting on this machine takes
    # the search bit off /tmp/pytest-of-<user>, and the Postgres user could no longer
    # reach its data dir to start again.
    base = tempfile.mkdtemp(prefix="slotguard-faults-")
    stacks: list[FaultStack] = []

    async def start(workers: int = 2, **settings) -> FaultStack:
        env = {env_name(name): str(value) for name, value in {**SHORT, **settings}.items()}
        stack = FaultStack(f"{base}/stack{len(stacks)}", workers=workers, env=env)
        stacks.append(stack)
        await stack.start()
        return stack

    yield start
    for stack in stacks:
        stack.stop()
    shutil.rmtree(base, ignore_errors=True)
