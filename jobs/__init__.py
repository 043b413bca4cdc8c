"""arq worker settings and jobs: commit-queue drain, expiry reaper, reconciliation."""
