"""A Plural payment link as typed, frozen values, read from Plural's JSON.

The shape is the seed's 200 schema (``cancel-payment-link.seed.md``). Absent fields
become None (or empty), unknown fields are kept in ``PaymentLink.extra``.

Read leniently: a cancel's outcome needs only the link's ``status``, so only a missing
or unreadable status raises :class:`LinkFormatError` (its message names the field,
never its value). Any other field that does not parse (a float phone number, a date in
another format) becomes None, its raw value goes to ``extra`` and its name to
``unreadable``: it stays out of every decision instead of turning a cancelled link
into an error. Customer data is personal data: it is kept out of every ``repr``.
Amounts are integers in the currency's minor unit (paisa for INR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from plural_cancel.errors import LinkFormatError

LINK_STATUSES = ("CREATED", "CLICKED", "PAYMENT_INITIATED", "PROCESSED",
                 "PARTIAL_PROCESSED", "CANCELLED", "EXPIRED")
"""Every status Plural documents for a payment link (there is no PAID or ACTIVE)."""


def parse_timestamp(value: Any, name: str = "timestamp") -> datetime | None:
    """An ISO 8601 string as an aware UTC datetime; None for None or "".

    Accepts what Plural sends: ``2025-03-21T08:29Z`` (no seconds), with or without
    milliseconds, ``Z`` or ``+00:00``; a time without offset is taken as UTC (Plural
    documents UTC everywhere) and a bare date as its midnight UTC.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LinkFormatError(f"{name} must be an ISO 8601 string, not {type(value).__name__}")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise LinkFormatError(f"{name} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def format_timestamp(moment: float | datetime, timespec: str = "milliseconds") -> str:
    """Epoch seconds (or an aware datetime) as ISO 8601 UTC with a ``Z``: ``2024-07-09T07:57:08.022Z``.

    The one way this product writes a time: Plural's ``Request-Timestamp``, status
    records, schedules, log lines. ``timespec`` as for :meth:`datetime.isoformat`.
    """
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def _object(data: Any, name: str) -> Mapping[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise LinkFormatError(f"{name} must be a JSON object, not {type(data).__name__}")
    return data


def _str(data: Mapping[str, Any], key: str, where: str, *, digits_ok: bool = False) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    # Phone numbers, pincodes and ids are digit strings that some serializers emit as numbers
    # (9876543210, or 9876543210.0 from a double).
    if digits_ok and isinstance(value, float) and value.is_integer():
        value = int(value)
    if digits_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise LinkFormatError(f"{where}.{key} must be a string, not {type(value).__name__}")


@dataclass(frozen=True)
class Money:
    """An amount: ``value`` in the minor unit (paisa), ``currency`` an ISO 4217 code ("" when absent)."""

    value: int
    currency: str

    @classmethod
    def from_dict(cls, data: Any, where: str = "amount") -> "Money | None":
        data = _object(data, where)
        if data is None:
            return None
        value = data.get("value", 0)  # the schema's default
        # JSON numbers like 100.0 are still whole paisa; fractions of a paisa are not money.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise LinkFormatError(f"{where}.value must be an integer (paisa), not {type(value).__name__}")
        return cls(value=value, currency=_str(data, "currency", where) or "")


@dataclass(frozen=True)
class Address:
    """A billing or shipping address: personal data, so nothing but its category shows in ``repr``."""

    address1: str | None = field(default=None, repr=False)
    address2: str | None = field(default=None, repr=False)
    address3: str | None = field(default=None, repr=False)
    pincode: str | None = field(default=None, repr=False)
    city: str | None = field(default=None, repr=False)
    state: str | None = field(default=None, repr=False)
    country: str | None = field(default=None, repr=False)
    full_name: str | None = field(default=None, repr=False)
    address_type: str | None = field(default=None, repr=False)
    address_category: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Address | None":
        data = _object(data, where)
        if data is None:
            return None
        plain = {key: _str(data, key, where, digits_ok=key == "pincode")
                 for key in ("address1", "address2", "address3", "pincode", "city", "state",
                             "country", "full_name", "address_category")}
        # The seed spells it "adddress_type" (three d's); accept the correct spelling too.
        address_type = _str(data, "address_type", where) or _str(data, "adddress_type", where)
        return cls(address_type=address_type, **plain)


@dataclass(frozen=True)
class Customer:
    """The payer as Plural knows them: personal data, kept out of ``repr``."""

    email_id: str | None = field(default=None, repr=False)
    first_name: str | None = field(default=None, repr=False)
    last_name: str | None = field(default=None, repr=False)
    customer_id: str | None = field(default=None, repr=False)
    mobile_number: str | None = field(default=None, repr=False)
    country_code: str | None = field(default=None, repr=False)
    billing_address: Address | None = field(default=None, repr=False)
    shipping_address: Address | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "customer") -> "Customer | None":
        data = _object(data, where)
        if data is None:
            return None
        return cls(
            email_id=_str(data, "email_id", where),
            first_name=_str(data, "first_name", where),
            last_name=_str(data, "last_name", where),
            customer_id=_str(data, "customer_id", where, digits_ok=True),
            mobile_number=_str(data, "mobile_number", where, digits_ok=True),
            country_code=_str(data, "country_code", where, digits_ok=True),
            billing_address=Address.from_dict(data.get("billing_address"), f"{where}.billing_address"),
            shipping_address=Address.from_dict(data.get("shipping_address"), f"{where}.shipping_address"),
        )


@dataclass(frozen=True)
class ProductDetail:
    """One line of the cart: a product code and its amounts (paisa)."""

    product_code: str | None = None
    product_amount: Money | None = None
    product_coupon_discount_amount: Money | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ProductDetail":
        data = _object(data, where)
        if data is None:
            raise LinkFormatError(f"{where} must be a JSON object, not null")
        return cls(
            product_code=_str(data, "product_code", where),
            product_amount=Money.from_dict(data.get("product_amount"), f"{where}.product_amount"),
            product_coupon_discount_amount=Money.from_dict(
                data.get("product_coupon_discount_amount"), f"{where}.product_coupon_discount_amount"),
        )


_KNOWN = frozenset({
    "payment_link", "payment_link_id", "status", "amount", "amount_due", "order_id",
    "merchant_payment_link_reference", "description", "expire_by", "merchant_order_reference",
    "allowed_payment_methods", "customer", "product_details", "cart_coupon_discount_amount",
    "merchant_metadata", "created_at", "updated_at", "cancelled_at",
})


@dataclass(frozen=True)
class PaymentLink:
    """A payment link as Plural returned it. Timestamps are aware UTC datetimes or None.

    ``status`` is kept as sent even when it is not one of :data:`LINK_STATUSES`, so a
    status Plural adds later is seen, not rejected. Free-text and merchant fields that
    may hold personal data (description, metadata, unknown fields) are kept out of ``repr``.
    """

    status: str
    payment_link_id: str | None = None
    payment_link: str | None = None
    amount: Money | None = None
    amount_due: Money | None = None
    order_id: str | None = None
    merchant_payment_link_reference: str | None = None
    description: str | None = field(default=None, repr=False)
    expire_by: datetime | None = None
    merchant_order_reference: str | None = None
    allowed_payment_methods: tuple[str, ...] = ()
    customer: Customer | None = field(default=None, repr=False)
    product_details: tuple[ProductDetail, ...] = field(default=(), repr=False)
    cart_coupon_discount_amount: Money | None = None
    merchant_metadata: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    cancelled_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    """Fields Plural sent that this model does not know, or could not read, as sent."""
    unreadable: tuple[str, ...] = ()
    """Names of the known fields that Plural sent in a shape this model could not read
    (their raw values are in ``extra``); none of them enters a decision."""

    @classmethod
    def from_dict(cls, data: Any) -> "PaymentLink":
        """Read Plural's JSON object. Raises :class:`LinkFormatError` only when it is not an
        object or its ``status`` is missing or not a string; any other field that cannot be
        read is set aside (see ``unreadable``)."""
        if not isinstance(data, Mapping):
            raise LinkFormatError(f"payment link must be a JSON object, not {type(data).__name__}")
        status = data.get("status")
        if not isinstance(status, str) or not status.strip():
            raise LinkFormatError("payment link has no status" if status is None
                                  else f"status must be a non-empty string, not {type(status).__name__}")
        where = "payment link"
        extra = {k: v for k, v in data.items() if k not in _KNOWN}
        unreadable: list[str] = []

        def read(name: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
            try:
                return parse(data.get(name))
            except (LinkFormatError, ValueError, TypeError, AttributeError):
                unreadable.append(name)
                extra[name] = data.get(name)
                return default

        fields = dict(
            payment_link_id=read("payment_link_id", lambda _: _str(data, "payment_link_id", where)),
            payment_link=read("payment_link", lambda _: _str(data, "payment_link", where)),
            amount=read("amount", lambda v: Money.from_dict(v, "amount")),
            amount_due=read("amount_due", lambda v: Money.from_dict(v, "amount_due")),
            order_id=read("order_id", lambda _: _str(data, "order_id", where)),
            merchant_payment_link_reference=read("merchant_payment_link_reference",
                                                 lambda _: _str(data, "merchant_payment_link_reference", where)),
            description=read("description", lambda _: _str(data, "description", where)),
            expire_by=read("expire_by", lambda v: parse_timestamp(v, "expire_by")),
            merchant_order_reference=read("merchant_order_reference",
                                          lambda _: _str(data, "merchant_order_reference", where)),
            allowed_payment_methods=read("allowed_payment_methods", _methods, ()),
            customer=read("customer", Customer.from_dict),
            product_details=read("product_details", _products, ()),
            cart_coupon_discount_amount=read("cart_coupon_discount_amount",
                                             lambda v: Money.from_dict(v, "cart_coupon_discount_amount")),
            merchant_metadata=read("merchant_metadata", lambda v: dict(_object(v, "merchant_metadata") or {}), {}),
            created_at=read("created_at", lambda v: parse_timestamp(v, "created_at")),
            updated_at=read("updated_at", lambda v: parse_timestamp(v, "updated_at")),
            cancelled_at=read("cancelled_at", lambda v: parse_timestamp(v, "cancelled_at")),
        )
        return cls(status=status.strip().upper(), extra=extra, unreadable=tuple(unreadable), **fields)


def _methods(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise LinkFormatError("allowed_payment_methods must be a list of strings")
    return tuple(value)


def _products(value: Any) -> tuple[ProductDetail, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise LinkFormatError(f"product_details must be a list, not {type(value).__name__}")
    return tuple(ProductDetail.from_dict(p, f"product_details[{i}]") for i, p in enumerate(value))
