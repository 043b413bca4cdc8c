"""slotguard: a Redis-centric, high-throughput hold engine."""

__version__ = "0.1.0"
