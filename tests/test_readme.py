"""The README stays true: the quick start names the two commands, every setting is
documented, and every CLI command in the table exists."""

from __future__ import annotations

import re
from pathlib import Path

from engine.settings import env_names

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_quick_start_has_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "slotguard up" in quick
    assert "bash scripts/test" in quick
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci  # CI runs the README's test command


def test_every_setting_is_documented():
    documented = set(re.findall(r"`((?:SLOTGUARD_[A-Z_]+)|REDIS_URL|DATABASE_URL)`", README))
    assert set(env_names()) <= documented
