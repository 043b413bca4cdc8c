"""``python -m slotguard``: the same command as the ``slotguard`` console script."""

from slotguard.cli import main

raise SystemExit(main())
