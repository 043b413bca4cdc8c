"""The slotguard HTTP API (Starlette)."""
