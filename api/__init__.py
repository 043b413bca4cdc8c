"""The Starlette partner API: routes, auth, errors, idempotency, OpenAPI, /metrics, health."""
