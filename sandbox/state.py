"""The link store and its state machine: create, get, cancel, and admin overrides.

One lock guards every change, so tests may call the store from their own thread while
the server's event loop serves HTTP. A ``CREATED`` or ``CLICKED`` link whose
``expire_by`` has passed turns ``EXPIRED`` the next time it is read (as Plural's own
links do, it cannot be cancelled after that).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from plural_cancel.sandbox.links import (
    CANCELLABLE,
    DEFAULT_LIFETIME,
    DEMO_LINKS,
    ID_RE,
    STATUSES,
    amount_due,
    build_link,
    customer_for,
    demo_links,
    iso_minutes,
    iso_ms,
    new_link_id,
    new_order_id,
    random_alnum,
    sample_link,
)

__all__ = ["DEMO_LINKS", "STATUSES", "LinkError", "LinkStore"]

MAX_BULK = 1_000_000
"""Most links one admin call may create."""


class LinkError(Exception):
    """A link operation refused; carries the HTTP status and Plural code to answer with."""

    def __init__(self, http_status: int, code: str, message: str):
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


@dataclass(slots=True)
class _Record:
    link: dict[str, Any]
    expire_at: float
    """Epoch seconds after which an unpaid link is EXPIRED."""
    cancel_count: int = 0
    """Cancels answered 200 (0 or 1: cancel is terminal)."""
    cancel_attempts: int = 0
    """Every cancel PUT that reached the sandbox for this id, faulted or not."""


class LinkStore:
    """Payment links by id, with Plural's statuses and transitions."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, seed_demo: bool = True):
        """``clock`` returns epoch seconds; ``rng`` makes ids and sample data reproducible."""
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._bulk_next: dict[str, int] = {}
        self._customers = [customer_for(i) for i in range(11)]
        if seed_demo:
            self.seed_demo()

    # -- reads -------------------------------------------------------------------------

    def get(self, link_id: str) -> dict[str, Any]:
        """A copy of the link's object; ``LinkError`` 404 when unknown."""
        with self._lock:
            return dict(self._live(link_id).link)

    def admin_view(self, link_id: str) -> dict[str, Any]:
        """The link plus ``cancel_count`` and ``cancel_attempts``."""
        with self._lock:
            record = self._live(link_id)
            view = dict(record.link)
            view["cancel_count"] = record.cancel_count
            view["cancel_attempts"] = record.cancel_attempts
            return view

    def __contains__(self, link_id: str) -> bool:
        with self._lock:
            return link_id in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def stats(self) -> dict[str, Any]:
        """Counts of links by status and of successful cancels."""
        with self._lock:
            by_status = dict.fromkeys(STATUSES, 0)
            cancels = attempts = 0
            for record in self._records.values():
                by_status[record.link["status"]] += 1
                cancels += record.cancel_count
                attempts += record.cancel_attempts
            return {"links": len(self._records), "by_status": by_status,
                    "cancel_count": cancels, "cancel_attempts": attempts}

    # -- Plural calls ------------------------------------------------------------------

    def note_cancel_attempt(self, link_id: str) -> None:
        """Count a cancel PUT for a known id, before faults or validation decide its fate."""
        with self._lock:
            record = self._records.get(link_id)
            if record is not None:
                record.cancel_attempts += 1

    def cancel(self, link_id: str) -> dict[str, Any]:
        """Cancel a CREATED or CLICKED link and return its object.

        Raises ``LinkError`` 404 ``NOT_FOUND`` for an unknown id and 400
        ``INVALID_REQUEST`` for any other status (including an already cancelled link).
        """
        with self._lock:
            record = self._live(link_id)
            link = record.link
            status = link["status"]
            if status not in CANCELLABLE:
                raise LinkError(400, "INVALID_REQUEST",
                                f"payment link is in status {status} and cannot be cancelled")
            stamp = iso_ms(self._clock())
            link["status"] = "CANCELLED"
            link["updated_at"] = stamp
            link["cancelled_at"] = stamp
            record.cancel_count += 1
            return dict(link)

    def create(self, body: Mapping[str, Any], *, expire_at: float) -> dict[str, Any]:
        """Create a CREATED link from a validated create-request body; return its object."""
        with self._lock:
            now = self._clock()
            link_id = self._fresh_id(now)
            link = build_link(
                link_id=link_id, order_id=new_order_id(self._rng, now),
                short_code=random_alnum(self._rng, 7).lower(), now=now,
                amount=body["amount"], reference=body["merchant_payment_link_reference"],
                expire_at=expire_at, customer=body.get("customer"),
                description=body.get("description"),
                merchant_order_reference=body.get("merchant_order_reference"),
                allowed_payment_methods=body.get("allowed_payment_methods"),
                product_details=body.get("product_details"),
                cart_coupon_discount_amount=body.get("cart_coupon_discount_amount"),
                merchant_metadata=body.get("merchant_metadata"))
            self._records[link_id] = _Record(link, expire_at)
            return dict(link)

    # -- admin -------------------------------------------------------------------------

    def seed_demo(self) -> list[str]:
        """(Re)create the demo links of ``DEMO_LINKS`` in their initial statuses."""
        with self._lock:
            now = self._clock()
            for link in demo_links(now, self._rng):
                self._records[link["payment_link_id"]] = _Record(link, now + DEFAULT_LIFETIME)
        return list(DEMO_LINKS)

    def add(self, link_id: str, status: str = "CREATED", *,
            expire_at: float | None = None) -> str:
        """Create one fully populated link with a chosen id; ``LinkError`` 409 if it exists."""
        _check_status(status)
        if not isinstance(link_id, str) or not ID_RE.match(link_id):
            raise LinkError(400, "INVALID_REQUEST", "id must be 1-50 characters of A-Za-z0-9_-")
        with self._lock:
            if link_id in self._records:
                raise LinkError(409, "DUPLICATE_REQUEST", f"payment link {link_id} already exists")
            self._insert(link_id, len(self._records), status, self._clock(), expire_at)
        return link_id

    def add_many(self, count: int, status: str = "CREATED", prefix: str | None = None, *,
                 expire_at: float | None = None) -> list[str]:
        """Create ``count`` links; ids are ``<prefix><n:06d>`` or Plural-style without a prefix."""
        _check_status(status)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_BULK:
            raise LinkError(400, "INVALID_REQUEST", f"count must be an integer in 1..{MAX_BULK}")
        if prefix is not None and (not isinstance(prefix, str) or len(prefix) > 40
                                   or (prefix and not ID_RE.match(prefix))):
            raise LinkError(400, "INVALID_REQUEST",
                            "prefix must be at most 40 characters of A-Za-z0-9_-")
        ids = []
        with self._lock:
            now = self._clock()
            n = self._bulk_next.get(prefix or "", 1)
            for _ in range(count):
                if prefix is None:
                    link_id = self._fresh_id(now)
                else:
                    while f"{prefix}{n:06d}" in self._records:
                        n += 1
                    link_id = f"{prefix}{n:06d}"
                    n += 1
                self._insert(link_id, n, status, now, expire_at)
                ids.append(link_id)
            self._bulk_next[prefix or ""] = n
        return ids

    def set_status(self, link_id: str, status: str) -> dict[str, Any]:
        """Force a link into any status (a customer paid, it expired...); return the admin view."""
        _check_status(status)
        with self._lock:
            record = self._live(link_id)
            link = record.link
            stamp = iso_ms(self._clock())
            link["status"] = status
            link["updated_at"] = stamp
            link["amount_due"] = {"value": amount_due(status, link["amount"]["value"]),
                                  "currency": link["amount"]["currency"]}
            if status == "CANCELLED":
                link.setdefault("cancelled_at", stamp)
            else:
                link.pop("cancelled_at", None)
            if status in CANCELLABLE and record.expire_at <= self._clock():
                # Re-opening a link must not have it expire again on the very next read.
                record.expire_at = self._clock() + 86400
            view = dict(link)
            view["cancel_count"] = record.cancel_count
            view["cancel_attempts"] = record.cancel_attempts
            return view

    def clear(self) -> None:
        """Forget every link."""
        with self._lock:
            self._records.clear()
            self._bulk_next.clear()

    # -- internals (lock held) ---------------------------------------------------------

    def _live(self, link_id: str) -> _Record:
        record = self._records.get(link_id)
        if record is None:
            raise LinkError(404, "NOT_FOUND", f"payment link {link_id} not found")
        link = record.link
        if link["status"] in CANCELLABLE and self._clock() >= record.expire_at:
            link["status"] = "EXPIRED"
            link["updated_at"] = iso_ms(record.expire_at)
        return record

    def _fresh_id(self, now: float) -> str:
        while True:
            link_id = new_link_id(self._rng, now)
            if link_id not in self._records:
                return link_id

    def _insert(self, link_id: str, index: int, status: str, now: float,
                expire_at: float | None) -> None:
        link = sample_link(link_id, index, status, now, self._rng, self._customers)
        if expire_at is None:
            expire_at = now + DEFAULT_LIFETIME
        else:
            link["expire_by"] = iso_minutes(expire_at)
        self._records[link_id] = _Record(link, expire_at)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise LinkError(400, "INVALID_REQUEST", f"status must be one of {', '.join(STATUSES)}")
