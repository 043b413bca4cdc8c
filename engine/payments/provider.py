"""The payment-provider interface and its one implementation, Stripe (stripe-python's
``StripeClient``, async calls over httpx).

Errors come back classified: :class:`Declined` (a card error: never retried),
:class:`InvalidMethod` (the payment method is unknown or unusable), :class:`Retryable`
(network, 429, 5xx, lock timeouts: retried with backoff by the caller) and :class:`Fatal`
(anything else). Idempotency keys are the caller's (``{operation}-{reservationId}-{attempt}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class ProviderError(Exception):
    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Declined(ProviderError):
    """The card was declined (or 3-D Secure failed)."""


class InvalidMethod(ProviderError):
    """The payment method does not exist or cannot be used."""


class Retryable(ProviderError):
    """A transient failure: the call may be made again (after checking what happened)."""


class Fatal(ProviderError):
    """A refusal that will not change by retrying."""


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    status: str
    amount: int
    amount_capturable: int = 0
    amount_received: int = 0
    next_action: dict[str, Any] | None = None
    latest_charge: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class PaymentProvider(Protocol):
    async def authorize(self, *, amount: int, currency: str, payment_method: str,
                        metadata: dict[str, str], idempotency_key: str,
                        stripe_account: str | None) -> Intent: ...

    async def retrieve(self, intent_id: str, *, stripe_account: str | None) -> Intent: ...

    async def capture(self, intent_id: str, *, idempotency_key: str,
                      stripe_account: str | None) -> Intent: ...

    async def cancel(self, intent_id: str, *, idempotency_key: str,
                     stripe_account: str | None) -> Intent: ...

    async def refund(self, intent_id: str, *, amount: int, idempotency_key: str,
                     stripe_account: str | None, metadata: dict[str, str]) -> str: ...

    async def annotate(self, intent_id: str, *, metadata: dict[str, str],
                       stripe_account: str | None) -> None: ...

    async def refunded(self, intent_id: str, *, stripe_account: str | None) -> int: ...

    def verify_event(self, payload: bytes, signature: str | None) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def intent_of(obj: Any) -> Intent:
    """A Stripe PaymentIntent (object or dict) as an :class:`Intent`."""
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    charge = get("latest_charge")
    if charge is not None and not isinstance(charge, str):
        charge = charge.get("id") if isinstance(charge, dict) else getattr(charge, "id", None)
    next_action = get("next_action")
    if next_action is not None and not isinstance(next_action, dict):
        next_action = next_action.to_dict() if hasattr(next_action, "to_dict") \
            else dict(next_action)
    metadata = get("metadata") or {}
    if not isinstance(metadata, dict):
        metadata = metadata.to_dict() if hasattr(metadata, "to_dict") else dict(metadata)
    return Intent(id=get("id"), status=get("status"), amount=int(get("amount") or 0),
                  amount_capturable=int(get("amount_capturable") or 0),
                  amount_received=int(get("amount_received") or 0),
                  next_action=next_action, latest_charge=charge,
                  metadata={str(k): str(v) for k, v in metadata.items()})


class StripeProvider:
    """:class:`PaymentProvider` on ``stripe.StripeClient`` (``*_async`` methods). The
    client's own retries are off: the orchestrator retries, after checking the intent."""

    def __init__(self, api_key: str, *, api_base: str = "", webhook_secret: str = "",
                 timeout_s: float = 20.0) -> None:
        import stripe

        self._stripe = stripe
        self.webhook_secret = webhook_secret
        self._http = stripe.HTTPXClient(timeout=timeout_s)
        self.client = stripe.StripeClient(
            api_key, http_client=self._http, max_network_retries=0,
            base_addresses={"api": api_base} if api_base else None)
        self.v1 = self.client.v1

    async def close(self) -> None:
        client = getattr(self._http, "_client_async", None)
        if client is not None:
            await client.aclose()

    def _options(self, key: str | None, account: str | None) -> dict:
        options: dict[str, Any] = {}
        if key:
            options["idempotency_key"] = key
        if account:
            options["stripe_account"] = account
        return options

    async def _call(self, call):
        stripe = self._stripe
        try:
            return await call
        except stripe.CardError as exc:
            raise Declined(exc.user_message or str(exc),
                           code=exc.code or "card_declined") from None
        except stripe.InvalidRequestError as exc:
            if exc.param == "payment_method" or exc.code == "resource_missing" \
                    or (exc.http_status == 404):
                raise InvalidMethod(exc.user_message or str(exc), code=exc.code) from None
            raise Fatal(exc.user_message or str(exc), code=exc.code) from None
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise Retryable(str(exc) or type(exc).__name__, code=type(exc).__name__) from None
        except stripe.APIError as exc:  # 5xx
            raise Retryable(str(exc) or "provider error", code="api_error") from None
        except stripe.StripeError as exc:
            status = getattr(exc, "http_status", None) or 0
            if status >= 500 or status in (409, 429):
                raise Retryable(str(exc), code=getattr(exc, "code", None)) from None
            raise Fatal(str(exc), code=getattr(exc, "code", None)) from None

    async def authorize(self, *, amount: int, currency: str, payment_method: str,
                        metadata: dict[str, str], idempotency_key: str,
                        stripe_account: str | None) -> Intent:
        params = {"amount": amount, "currency": currency, "payment_method": payment_method,
                  "capture_method": "manual", "confirm": True,
                  "payment_method_types": ["card"], "metadata": metadata}
        obj = await self._call(self.v1.payment_intents.create_async(
            params=params, options=self._options(idempotency_key, stripe_account)))
        return intent_of(obj)

    async def retrieve(self, intent_id: str, *, stripe_account: str | None) -> Intent:
        obj = await self._call(self.v1.payment_intents.retrieve_async(
            intent_id, options=self._options(None, stripe_account)))
        return intent_of(obj)

    async def capture(self, intent_id: str, *, idempotency_key: str,
                      stripe_account: str | None) -> Intent:
        obj = await self._call(self.v1.payment_intents.capture_async(
            intent_id, options=self._options(idempotency_key, stripe_account)))
        return intent_of(obj)

    async def cancel(self, intent_id: str, *, idempotency_key: str,
                     stripe_account: str | None) -> Intent:
        obj = await self._call(self.v1.payment_intents.cancel_async(
            intent_id, options=self._options(idempotency_key, stripe_account)))
        return intent_of(obj)

    async def refund(self, intent_id: str, *, amount: int, idempotency_key: str,
                     stripe_account: str | None, metadata: dict[str, str]) -> str:
        obj = await self._call(self.v1.refunds.create_async(
            params={"payment_intent": intent_id, "amount": amount, "metadata": metadata},
            options=self._options(idempotency_key, stripe_account)))
        return obj.id

    async def refunded(self, intent_id: str, *, stripe_account: str | None) -> int:
        """How much of the intent's charge is refunded (minor units), as the provider
        says: what a refund interrupted before its answer did."""
        intent = await self.retrieve(intent_id, stripe_account=stripe_account)
        if intent.latest_charge is None:
            return 0
        charge = await self._call(self.v1.charges.retrieve_async(
            intent.latest_charge, options=self._options(None, stripe_account)))
        return int(getattr(charge, "amount_refunded", 0) or 0)

    async def annotate(self, intent_id: str, *, metadata: dict[str, str],
                       stripe_account: str | None) -> None:
        """Set metadata keys on an intent (the booking id after commit)."""
        await self._call(self.v1.payment_intents.update_async(
            intent_id, params={"metadata": metadata},
            options=self._options(None, stripe_account)))

    def verify_event(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """The event, once its ``Stripe-Signature`` verifies against the webhook secret
        (``stripe.Webhook.construct_event`` on the raw body); ValueError otherwise."""
        stripe = self._stripe
        if not self.webhook_secret or not signature:
            raise ValueError("no signature or no webhook secret configured")
        try:
            event = stripe.Webhook.construct_event(payload, signature, self.webhook_secret)
        except stripe.SignatureVerificationError as exc:
            raise ValueError(str(exc)) from None
        return event.to_dict() if hasattr(event, "to_dict") else dict(event)


def provider_from_settings(settings) -> StripeProvider | None:
    """The configured provider, or None when no Stripe key is set."""
    if not settings.stripe_api_key:
        return None
    return StripeProvider(settings.stripe_api_key, api_base=settings.stripe_api_base,
                          webhook_secret=settings.stripe_webhook_secret,
                          timeout_s=settings.stripe_timeout_ms / 1000)
