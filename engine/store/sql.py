"""SQL helpers the store's statements share."""

from __future__ import annotations


def ts_sql(ms_column: str) -> str:
    """SQL turning integer ms since the epoch into timestamptz, exactly (no float detour)."""
    return f"(timestamptz 'epoch' + {ms_column} * interval '1 millisecond')"


def ms_sql(ts_column: str) -> str:
    return f"(extract(epoch FROM {ts_column}) * 1000)::bigint"
