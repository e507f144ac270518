"""Payment-link objects in the seed's shape, their ids and timestamps, and the demo data.

Everything here is pure: functions take the time (epoch seconds) and a random source
as arguments and return plain dicts, so the store decides when and how they change.
"""

from __future__ import annotations

import base64
import functools
import random
import re
import string
import time
from datetime import datetime, timezone
from typing import Any, Mapping

STATUSES = ("CREATED", "CLICKED", "PAYMENT_INITIATED", "PROCESSED", "PARTIAL_PROCESSED",
            "CANCELLED", "EXPIRED")
"""Every status Plural documents for a payment link."""

CANCELLABLE = frozenset({"CREATED", "CLICKED"})
"""Statuses from which a cancel succeeds (nobody has paid or started paying)."""

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,50}\Z")
"""A payment link id, and a merchant reference: 1 to 50 characters of ``A-Za-z0-9_-``."""

DEFAULT_LIFETIME = 30 * 86400
"""Seconds a link stays payable when the creator gives no ``expire_by``."""

PAYMENT_METHODS = ("CARD", "UPI", "NETBANKING", "WALLET")

_ALNUM = string.ascii_letters + string.digits


def iso_ms(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds, e.g. ``2025-03-06T08:27:55.881Z``."""
    secs, ms = divmod(int(round(ts * 1000)), 1000)
    return _iso_seconds(secs) + ".%03dZ" % ms


@functools.lru_cache(maxsize=64)
def _iso_seconds(secs: int) -> str:
    # Cached: every cancel stamps the current second, and formatting it is most of a stamp's cost.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def iso_minutes(ts: float) -> str:
    """Epoch seconds as the seed's ``expire_by`` format, without seconds: ``2025-03-21T08:29Z``."""
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ts))


def parse_iso(value: str) -> float:
    """ISO 8601 text (``Z`` or an offset; no zone means UTC) as epoch seconds.

    Accepts the seed's minute-only form. Raises ``ValueError`` for anything else.
    """
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ValueError("not an ISO 8601 timestamp")
    text = value.strip()
    # The seed's expire_by has no seconds ("2025-03-21T08:29Z"); fromisoformat accepts
    # "HH:MM" but not "HH:MMZ" before 3.11 on every platform, so normalise the zone.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def random_alnum(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_ALNUM, k=length))


def new_link_id(rng: random.Random, now: float) -> str:
    """A Plural-style id, ``pl-v1-<yymmddHHMMSS>-aa-<6 letters or digits>``."""
    stamp = time.strftime("%y%m%d%H%M%S", time.gmtime(now))
    return f"pl-v1-{stamp}-aa-{random_alnum(rng, 6)}"


def new_order_id(rng: random.Random, now: float) -> str:
    return "v1-" + time.strftime("%y%m%d%H%M%S", time.gmtime(now)) + "-aa-" + random_alnum(rng, 6)


def _address(line1: str, line2: str, line3: str, pincode: str, city: str, state: str,
             full_name: str, category: str) -> dict[str, str]:
    # "adddress_type" (three d's) is the seed's spelling; clients must see it as Plural sends it.
    return {"address1": line1, "address2": line2, "address3": line3, "pincode": pincode,
            "city": city, "state": state, "country": "India", "full_name": full_name,
            "adddress_type": "Home" if category == "billing" else "Office",
            "address_category": category}


# first, last, mobile, customer id, billing (street, area, landmark, pincode, city, state)
_PEOPLE = (
    ("Aarav", "Sharma", "9820012345", "CUST-10001",
     ("14 Marine Drive", "Churchgate", "Near Eros Cinema", "400020", "Mumbai", "Maharashtra")),
    ("Priya", "Iyer", "9840023456", "CUST-10002",
     ("22 Cathedral Road", "Gopalapuram", "Opposite Stella Maris", "600086", "Chennai",
      "Tamil Nadu")),
    ("Rohan", "Mehta", "9811034567", "CUST-10003",
     ("7 Prithviraj Road", "Lodhi Estate", "Behind Khan Market", "110003", "New Delhi", "Delhi")),
    ("Ananya", "Reddy", "9848045678", "CUST-10004",
     ("301 Road No 12", "Banjara Hills", "Near KBR Park", "500034", "Hyderabad", "Telangana")),
    ("Vikram", "Nair", "9895056789", "CUST-10005",
     ("18 MG Road", "Ernakulam South", "Near Shipyard Gate", "682016", "Kochi", "Kerala")),
    ("Sneha", "Banerjee", "9830067890", "CUST-10006",
     ("45 Park Street", "Mullick Bazar", "Above Flurys", "700016", "Kolkata", "West Bengal")),
    ("Arjun", "Kulkarni", "9822078901", "CUST-10007",
     ("9 Law College Road", "Erandwane", "Near Nal Stop", "411004", "Pune", "Maharashtra")),
    ("Meera", "Pillai", "9886089012", "CUST-10008",
     ("112 Indiranagar 100 Feet Road", "HAL 2nd Stage", "Near Toit", "560038", "Bengaluru",
      "Karnataka")),
    ("Kabir", "Singh", "9814090123", "CUST-10009",
     ("56 Sector 17", "Madhya Marg", "Near Neelam Theatre", "160017", "Chandigarh", "Chandigarh")),
    ("Isha", "Desai", "9825001234", "CUST-10010",
     ("3 CG Road", "Navrangpura", "Near Municipal Market", "380009", "Ahmedabad", "Gujarat")),
    ("Nikhil", "Joshi", "9829012346", "CUST-10011",
     ("27 MI Road", "Panch Batti", "Near Raj Mandir", "302001", "Jaipur", "Rajasthan")),
)


def customer_for(index: int) -> dict[str, Any]:
    """Realistic, deterministic customer personal data (the kind a leak test looks for)."""
    first, last, mobile, customer_id, (street, area, landmark, pincode, city, state) = \
        _PEOPLE[index % len(_PEOPLE)]
    full = f"{first} {last}"
    billing = _address(street, area, landmark, pincode, city, state, full, "billing")
    shipping = _address(f"Flat {index % 90 + 10}, {street}", area, landmark, pincode, city, state,
                        full, "shipping")
    return {"email_id": f"{first}.{last}@example.com".lower(), "first_name": first,
            "last_name": last, "customer_id": customer_id, "mobile_number": mobile,
            "country_code": "91", "billing_address": billing, "shipping_address": shipping}


def _money(value: int, currency: str = "INR") -> dict[str, Any]:
    return {"value": value, "currency": currency}


# Plural carries the offer as base64 of a query string; no offer applies to these links.
_OFFER_DATA = base64.b64encode(b'Product_Code=""&Payment_Mode=UPI&Description=No offer'
                               b"&Product_Value=0").decode("ascii").rstrip("=")


def _metadata(index: int) -> dict[str, str]:
    return {"clientId": "DD", "transactionReferenceNo": f"pine-{1200 + index}",
            "merchantId": "1234", "tid": "9000990", "acquirerName": "HDFC_FSS",
            "isOfferDisplayRequired": "false", "OfferData": _OFFER_DATA, "tenant_id": "PGATPOS",
            "is_offer_validation_required": "false"}


def build_link(*, link_id: str, order_id: str, short_code: str, now: float, amount: Mapping,
               reference: str, expire_at: float, status: str = "CREATED",
               customer: Mapping | None = None, description: str | None = None,
               merchant_order_reference: str | None = None,
               allowed_payment_methods: list | None = None, product_details: list | None = None,
               cart_coupon_discount_amount: Mapping | None = None,
               merchant_metadata: Mapping | None = None) -> dict[str, Any]:
    """A link object with every top-level key of the seed's cancel response.

    ``cancelled_at`` appears only once the link is cancelled. Nested values are kept by
    reference: callers must treat them as read-only.
    """
    value, currency = amount["value"], amount["currency"]
    return {
        "payment_link": f"https://shortener.v2.pinepg.in/PLUTUS/{short_code}",
        "payment_link_id": link_id,
        "status": status,
        "amount": _money(value, currency),
        "amount_due": _money(amount_due(status, value), currency),
        "order_id": order_id,
        "merchant_payment_link_reference": reference,
        "description": description if description is not None else f"Payment for order {reference}",
        "expire_by": iso_minutes(expire_at),
        "merchant_order_reference": merchant_order_reference or reference,
        "allowed_payment_methods": list(allowed_payment_methods or PAYMENT_METHODS),
        "customer": customer if customer is not None else {},
        "product_details": product_details if product_details is not None else [],
        "cart_coupon_discount_amount": cart_coupon_discount_amount or _money(0, currency),
        "merchant_metadata": merchant_metadata if merchant_metadata is not None else {},
        "created_at": iso_ms(now),
        "updated_at": iso_ms(now),
    }


def amount_due(status: str, value: int) -> int:
    """Paisa still owed on a link: nothing once paid, half of it when partly paid."""
    if status == "PROCESSED":
        return 0
    if status == "PARTIAL_PROCESSED":
        return value // 2
    return value


def sample_link(link_id: str, index: int, status: str, now: float, rng: random.Random,
                customers: list[dict] | None = None) -> dict[str, Any]:
    """A fully populated link (customer, products, metadata) for demo and bulk links.

    ``customers`` lets bulk creation share a few read-only customer dicts between links.
    """
    value = 10000 + (index % 97) * 2500
    reference = f"ref-{link_id}"[:50]
    customer = customers[index % len(customers)] if customers else customer_for(index)
    products = [{"product_code": f"SKU-{1000 + index % 50}",
                 "product_amount": {"currency": "INR", "value": value},
                 "product_coupon_discount_amount": {"currency": "INR", "value": 0}}]
    link = build_link(link_id=link_id, order_id=new_order_id(rng, now),
                      short_code=random_alnum(rng, 7).lower(), now=now,
                      amount=_money(value), reference=reference,
                      expire_at=now + DEFAULT_LIFETIME, status=status, customer=customer,
                      description=f"Payment for order #{20000 + index}",
                      allowed_payment_methods=["CARD", "UPI", "NETBANKING"],
                      product_details=products, merchant_metadata=_metadata(index))
    if status == "CANCELLED":
        link["cancelled_at"] = iso_ms(now)
    return link


def _demo_ids() -> dict[str, str]:
    ids = {f"pl-demo-created-{n:02d}": "CREATED" for n in range(1, 6)}
    for status in STATUSES[1:]:
        ids[f"pl-demo-{status.lower().replace('_', '-')}-01"] = status
    return ids


DEMO_LINKS: dict[str, str] = _demo_ids()
"""Links seeded at start-up: id -> initial status. Five CREATED, one of every other status."""


def demo_links(now: float, rng: random.Random) -> list[dict[str, Any]]:
    """The demo links, each with its own customer's personal data."""
    return [sample_link(link_id, index, status, now, rng)
            for index, (link_id, status) in enumerate(DEMO_LINKS.items())]


def personal_data(link: Mapping[str, Any]) -> set[str]:
    """Every customer personal value in a link (e-mail, phone, names, address lines).

    Tests use it to assert that none of these strings reached logs, Redis or Sentry.
    """
    customer = link.get("customer") or {}
    found = {customer.get(k) for k in ("email_id", "mobile_number", "first_name", "last_name")}
    for key in ("billing_address", "shipping_address"):
        address = customer.get(key) or {}
        found |= {address.get(k) for k in ("address1", "address2", "address3", "full_name")}
    return {v for v in found if isinstance(v, str) and v}


DEMO_PERSONAL_DATA: frozenset[str] = frozenset().union(
    *(personal_data(link) for link in demo_links(0.0, random.Random(0))))
"""The personal data of every demo link (it does not depend on the time or the seed)."""
