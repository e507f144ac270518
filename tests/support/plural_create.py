"""Creating a payment link, which the product never does (merchants create their links):
for tests of the client's machinery on a POST (its path, body and Idempotency-Key)."""

from __future__ import annotations

import re
from typing import Any

from plural_cancel.worker.links import PaymentLink
from plural_cancel.worker.plural import PluralClient, new_request_id
from plural_cancel.worker.validation import validate_request_id

REFERENCE = re.compile(r"[A-Za-z0-9_-]{1,50}")
"""merchant_payment_link_reference: 1-50 of A-Za-z0-9-_, as Plural documents it for create."""


def create_payment_link(client: PluralClient, amount_paisa: int, merchant_reference: str, *,
                        currency: str = "INR", request_id: str | None = None, **extra: Any) -> PaymentLink:
    """``POST /pay/v1/paymentlink`` for ``amount_paisa`` (integer paisa) through ``client``;
    ``extra`` adds Plural's optional fields."""
    if not isinstance(amount_paisa, int) or isinstance(amount_paisa, bool) or amount_paisa <= 0:
        raise ValueError("amount_paisa must be a positive integer (paisa)")
    if not isinstance(merchant_reference, str) or not REFERENCE.fullmatch(merchant_reference):
        raise ValueError("merchant_reference must be 1 to 50 characters of A-Z a-z 0-9 _ -")
    request_id = validate_request_id(request_id) if request_id is not None else new_request_id()
    body = {**extra, "amount": {"value": amount_paisa, "currency": currency},
            "merchant_payment_link_reference": merchant_reference}
    return client._link(client._bearer("POST", "/pay/v1/paymentlink", request_id, json_body=body), request_id)
