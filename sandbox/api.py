"""Plural's own paths under ``/api``: Generate Token, create, get and cancel payment link.

Every request is logged on arrival, then the faults have their say, then the call is
served. See the package docstring for which 4xx answers come back when.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Callable, Mapping

from plural_cancel.sandbox.faults import FaultInjector, Faults
from plural_cancel.sandbox.links import DEFAULT_LIFETIME, ID_RE, iso_ms, parse_iso
from plural_cancel.sandbox.replies import (
    Reply,
    injected,
    invalid_request,
    json_reply,
    method_not_allowed,
    not_found,
    plural_error,
    unauthorized,
)
from plural_cancel.sandbox.reqlog import Entry, RequestLog
from plural_cancel.sandbox.request import Request
from plural_cancel.sandbox.state import LinkError, LinkStore
from plural_cancel.sandbox.tokens import TokenStore

TOKEN_PATH = "/api/auth/v1/token"
LINKS_PATH = "/api/pay/v1/paymentlink"
_LINK_PATH = re.compile(r"/api/pay/v1/paymentlink/([^/]*)(/cancel)?\Z")
_CURRENCY = re.compile(r"[A-Z]{3}\Z")
TOKEN_STYLES = ("expires_at", "expires_in")


class PluralAPI:
    """Serves one /api request at a time into a :class:`Reply` (never raises for bad input)."""

    def __init__(self, *, store: LinkStore, tokens: TokenStore, faults: FaultInjector,
                 log: RequestLog, token_style: str = "expires_at",
                 clock: Callable[[], float] = time.time):
        if token_style not in TOKEN_STYLES:
            raise ValueError(f"token_style must be one of {', '.join(TOKEN_STYLES)}")
        self.store = store
        self.tokens = tokens
        self.faults = faults
        self.log = log
        self.token_style = token_style
        self._clock = clock

    def handle(self, req: Request) -> Reply:
        match = _LINK_PATH.match(req.path)
        link_id = match.group(1) if match else None
        is_cancel = bool(match and match.group(2))
        token_call = req.path == TOKEN_PATH
        account = self._named_account(req) if token_call else self._token_account(req)
        entry = self.log.record(req.method, req.path, link_id or None,
                                req.headers.get("request-id"), account)
        with contextlib.suppress(ValueError):  # a bad one is answered 400 (_header_problem)
            entry.sent_at = parse_iso(req.headers.get("request-timestamp"))
        cancel = is_cancel and req.method == "PUT"
        if cancel and link_id:
            self.store.note_cancel_attempt(link_id)
        faults = self.faults.for_account(account)
        decision = self.faults.decide(faults, now=entry.timestamp, token_call=token_call,
                                      link_id=link_id, cancel=cancel, account=account)
        entry.fault = decision.label
        if decision.reset:
            return Reply(0, reset=True, delay=decision.delay)
        if decision.status is not None:
            step = ("TOKEN" if token_call else "CANCEL" if is_cancel
                    else "GET" if match else "CREATE")
            retry_after = faults.retry_after if decision.retry_after is None else decision.retry_after
            reply = injected(decision.status, step, retry_after)
        else:
            reply = self._route(req, match, link_id, is_cancel, entry, account, faults)
        entry.status = reply.status
        reply.delay = decision.delay
        return reply

    def _token_account(self, req: Request) -> str | None:
        """The account of the call's bearer token; None without a valid one."""
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return self.tokens.owner(token.strip()) if scheme.lower() == "bearer" else None

    def _named_account(self, req: Request) -> str | None:
        """The account a Generate Token body names, before its secret is checked (so that
        account's own faults reach its token calls too); None if it names none."""
        if req.method != "POST":
            return None
        try:
            body = req.json()
        except ValueError:  # answered 400 by _token
            return None
        client_id = body.get("client_id") if isinstance(body, dict) else None
        if isinstance(client_id, str) and client_id and self.tokens.is_account(client_id):
            return client_id
        return None

    # -- routing -----------------------------------------------------------------------

    def _route(self, req: Request, match: re.Match | None, link_id: str | None,
               is_cancel: bool, entry: Entry, account: str | None, faults: Faults) -> Reply:
        if req.path == TOKEN_PATH:
            return self._token(req, entry, faults) if req.method == "POST" else method_not_allowed("POST")
        if req.path == LINKS_PATH:
            if req.method != "POST":
                return method_not_allowed("POST")
            return self._guarded(req, entry, account, faults, None, lambda r, _: self._create(r, entry))
        if match is None:
            return plural_error(404, "NOT_FOUND", f"no such endpoint: {req.path}")
        if is_cancel:
            return self._guarded(req, entry, account, faults, link_id, self._cancel) \
                if req.method == "PUT" else method_not_allowed("PUT")
        return self._guarded(req, entry, account, faults, link_id, self._get) if req.method == "GET" \
            else method_not_allowed("GET")

    def _guarded(self, req: Request, entry: Entry, account: str | None, faults: Faults,
                 link_id: str | None, action: Callable[[Request, str | None], Reply]) -> Reply:
        """Checks every payment-link call passes first: token (``account``: its owner, None
        without a valid one), then headers, then the id."""
        if account is None or faults.reject_tokens:
            scheme, _, token = req.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return unauthorized("missing bearer token in the Authorization header")
            return unauthorized("access token is invalid or expired")
        problem = _header_problem(req, entry, required=True)
        if problem:
            return invalid_request(problem)
        if link_id is not None and not ID_RE.match(link_id):
            return invalid_request("payment_link_id must be 1-50 characters of A-Za-z0-9_-")
        return action(req, link_id)

    # -- calls -------------------------------------------------------------------------

    def _token(self, req: Request, entry: Entry, faults: Faults) -> Reply:
        problem = _header_problem(req, entry, required=False)
        if problem:
            return invalid_request(problem)
        try:
            body = req.json()
        except ValueError:
            return invalid_request("request body must be a JSON object")
        if not isinstance(body, dict):
            return invalid_request("request body must be a JSON object")
        for name in ("client_id", "client_secret", "grant_type"):
            value = body.get(name)
            if not isinstance(value, str) or not value:
                return invalid_request(f"{name} is required")
        if body["grant_type"] != "client_credentials":
            return invalid_request("grant_type must be client_credentials")
        account = self.tokens.account_for(body["client_id"], body["client_secret"])
        if account is None:
            return plural_error(422, "USER_AUTHENTICATION_FAILED",
                                "client_id or client_secret is not valid")
        ttl = faults.token_ttl
        token, expires_at = self.tokens.issue(ttl, account)
        if self.token_style == "expires_in":
            return json_reply(200, {"access_token": token,
                                    "expires_in": int(ttl) if ttl == int(ttl) else ttl})
        return json_reply(200, {"access_token": token, "expires_at": iso_ms(expires_at)})

    def _get(self, req: Request, link_id: str | None) -> Reply:
        try:
            return json_reply(200, self.store.get(link_id))
        except LinkError as err:
            return not_found(err.message, "GET")

    def _cancel(self, req: Request, link_id: str | None) -> Reply:
        try:
            return json_reply(200, self.store.cancel(link_id))
        except LinkError as err:
            if err.http_status == 404:
                return not_found(err.message, "CANCEL")
            return plural_error(err.http_status, err.code, err.message,
                                details_key="additional_error_details",
                                source="PAYMENT_LINK", step="CANCEL")

    def _create(self, req: Request, entry: Entry) -> Reply:
        try:
            body = req.json()
        except ValueError:
            return invalid_request("request body must be a JSON object")
        problem = create_problem(body)
        if problem:
            return invalid_request(problem, details_key="additional_error_details",
                                   source="PAYMENT_LINK", step="CREATE")
        now = self._clock()
        if body.get("expire_by") is not None:
            expire_at = parse_iso(body["expire_by"])
            if expire_at <= now:
                return invalid_request("expire_by must be in the future")
        else:
            expire_at = now + DEFAULT_LIFETIME
        link = self.store.create(body, expire_at=expire_at)
        entry.link_id = link["payment_link_id"]
        return json_reply(200, link)


def _header_problem(req: Request, entry: Entry, *, required: bool) -> str | None:
    """What is wrong with ``Request-ID`` / ``Request-Timestamp``, or None. The timestamp was
    parsed once, on arrival, into ``entry.sent_at``."""
    request_id = req.headers.get("request-id")
    if request_id is None:
        if required:
            return "Request-ID header is required"
    elif not 1 <= len(request_id) <= 50:
        return "Request-ID must be 1-50 characters"
    if entry.sent_at is None and req.headers.get("request-timestamp") is not None:
        return "Request-Timestamp must be an ISO 8601 UTC timestamp"
    return None


def _money_problem(name: str, value: Any, *, positive: bool) -> str | None:
    if not isinstance(value, Mapping):
        return f"{name} must be an object with value and currency"
    amount = value.get("value")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < (1 if positive else 0):
        return f"{name}.value must be {'a positive' if positive else 'a non-negative'} " \
               "integer (paisa)"
    if not isinstance(value.get("currency"), str) or not _CURRENCY.match(value["currency"]):
        return f"{name}.currency must be a 3-letter currency code"
    return None


def create_problem(body: Any) -> str | None:
    """What is wrong with a create-payment-link body, naming the field, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    problem = _money_problem("amount", body.get("amount"), positive=True)
    if problem:
        return problem
    reference = body.get("merchant_payment_link_reference")
    if not isinstance(reference, str) or not ID_RE.match(reference):
        return "merchant_payment_link_reference must be 1-50 characters of A-Za-z0-9-_"
    for name, kind, what in (("customer", dict, "an object"),
                             ("merchant_metadata", dict, "an object"),
                             ("product_details", list, "an array"),
                             ("allowed_payment_methods", list, "an array"),
                             ("description", str, "a string"),
                             ("merchant_order_reference", str, "a string")):
        if body.get(name) is not None and not isinstance(body[name], kind):
            return f"{name} must be {what}"
    if body.get("cart_coupon_discount_amount") is not None:
        problem = _money_problem("cart_coupon_discount_amount",
                                 body["cart_coupon_discount_amount"], positive=False)
        if problem:
            return problem
    methods = body.get("allowed_payment_methods") or []
    if not all(isinstance(m, str) and m for m in methods):
        return "allowed_payment_methods must be an array of strings"
    if body.get("expire_by") is not None:
        try:
            parse_iso(body["expire_by"])
        except (TypeError, ValueError):
            return "expire_by must be an ISO 8601 timestamp"
    return None
