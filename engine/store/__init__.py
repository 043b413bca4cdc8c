"""Postgres, the system of record, cut by concern:

- :mod:`engine.store.events`: stream entries -> columns (parsing, checks, path expansion);
- :mod:`engine.store.commit`: the batch commit (apply_batch) and its SQL;
- :mod:`engine.store.queries`: read models and audit queries;
- :mod:`engine.store.review`: manual review and dead letters.
"""
