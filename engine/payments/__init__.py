"""Payments (issue 12): vendor terms, the provider interface and its Stripe implementation,
the orchestrator (authorization, capture at commit, compensation, cancellation refunds,
inbound Stripe events, stale-authorization cleanup)."""
