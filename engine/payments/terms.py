"""A vendor's payment terms and their rules, checked before any write (admin API and CLI).

Amounts are minor units (cents) of an ISO 4217 currency from :data:`CURRENCIES`.
A vendor that requires payment must state a price, a deposit and a currency.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.errors import ValidationError

# Currencies Stripe charges in with two minor digits (the amounts cap assumes them), plus
# the zero-decimal ones most asked for. Lower case, as Stripe writes them.
CURRENCIES = frozenset({
    "usd", "eur", "gbp", "chf", "cad", "aud", "nzd", "sek", "nok", "dkk", "pln", "czk",
    "huf", "ron", "bgn", "sgd", "hkd", "mxn", "brl", "inr", "zar", "ils", "aed", "jpy", "krw",
})
MAX_AMOUNT = 99_999_999  # Stripe's cap on one charge, in minor units (999,999.99)
MAX_CUTOFF_MINUTES = 525_600  # a year
REFUND_POLICIES = ("full", "none", "full_before")
STRIPE_ACCOUNT_RE = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    payment_required: bool = False
    price_amount: int | None = None
    deposit_amount: int | None = None
    currency: str | None = None
    stripe_account_id: str | None = None
    refund_policy: str = "full"
    refund_cutoff_minutes: int | None = None


FIELDS = {"payment_required": "paymentRequired", "price_amount": "priceAmount",
          "deposit_amount": "depositAmount", "currency": "currency",
          "stripe_account_id": "stripeAccountId", "refund_policy": "refundPolicy",
          "refund_cutoff_minutes": "refundCutoffMinutes"}


def _invalid(field: str, message: str, code: str = "INVALID_FIELD", **extra: Any):
    return ValidationError(message, code=code, details={"field": field, **extra})


def check_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Each given field's own rules (PaymentTerms field names; None = not given/cleared);
    the values as stored (currency lower case)."""
    out = dict(values)
    if values.get("payment_required") is not None \
            and not isinstance(values["payment_required"], bool):
        raise _invalid("paymentRequired", "paymentRequired must be true or false")
    for name in ("price_amount", "deposit_amount"):
        value = values.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) \
                or not 0 < value <= MAX_AMOUNT:
            raise _invalid(FIELDS[name], f"{FIELDS[name]} must be an integer amount in minor "
                           f"units between 1 and {MAX_AMOUNT}", code="INVALID_AMOUNT",
                           minimum=1, maximum=MAX_AMOUNT)
    currency = values.get("currency")
    if currency is not None:
        if not isinstance(currency, str) or currency.lower() not in CURRENCIES:
            raise _invalid("currency", "currency must be an ISO 4217 code Stripe charges in",
                           code="UNKNOWN_CURRENCY", allowed=sorted(CURRENCIES))
        out["currency"] = currency.lower()
    account = values.get("stripe_account_id")
    if account is not None and (not isinstance(account, str)
                                or not STRIPE_ACCOUNT_RE.match(account)):
        raise _invalid("stripeAccountId", "stripeAccountId must look like acct_...")
    policy = values.get("refund_policy")
    if policy is not None and policy not in REFUND_POLICIES:
        raise _invalid("refundPolicy", "refundPolicy must be full, none or full_before",
                       allowed=list(REFUND_POLICIES))
    cutoff = values.get("refund_cutoff_minutes")
    if cutoff is not None and (not isinstance(cutoff, int) or isinstance(cutoff, bool)
                               or not 0 <= cutoff <= MAX_CUTOFF_MINUTES):
        raise _invalid("refundCutoffMinutes",
                       f"refundCutoffMinutes must be between 0 and {MAX_CUTOFF_MINUTES}")
    return out


def check_terms(terms: PaymentTerms, *, complete: bool = True) -> PaymentTerms:
    """The terms as stored (currency lower case), or a typed 400 naming the field. With
    ``complete`` a vendor that requires payment must state price, deposit and currency (the
    admin API and the CLI ask it; a vendor stored without them answers 409
    PAYMENT_TERMS_INCOMPLETE at authorization)."""
    import dataclasses

    values = check_fields({f.name: getattr(terms, f.name)
                           for f in dataclasses.fields(PaymentTerms)})
    terms = PaymentTerms(**values)
    if terms.refund_policy is None:
        raise _invalid("refundPolicy", "refundPolicy must be full, none or full_before",
                       allowed=list(REFUND_POLICIES))
    cutoff = terms.refund_cutoff_minutes
    if terms.refund_policy == "full_before" and cutoff is None:
        raise _invalid("refundCutoffMinutes", "refundPolicy full_before needs "
                       "refundCutoffMinutes")
    if terms.refund_policy != "full_before" and cutoff is not None:
        raise _invalid("refundCutoffMinutes", "refundCutoffMinutes applies to refundPolicy "
                       "full_before only")
    if terms.payment_required and complete:
        for name in ("price_amount", "deposit_amount", "currency"):
            if getattr(terms, name) is None:
                raise _invalid(FIELDS[name], f"a vendor that requires payment needs "
                               f"{FIELDS[name]}", code="MISSING_FIELD")
    return terms
