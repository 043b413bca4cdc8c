"""slotguard's benchmark suite: contention scenarios, baselines and the verifier."""
