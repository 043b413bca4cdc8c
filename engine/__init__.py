"""slotguard's domain core: key layout, script loader, holds, lifecycle, limits, settings."""
