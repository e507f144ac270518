"""The ``/_admin`` endpoints: request log, faults, tokens, links, health. No auth, no faults."""

from __future__ import annotations

import re
from typing import Any

from plural_cancel.sandbox.faults import FaultInjector
from plural_cancel.sandbox.links import parse_iso
from plural_cancel.sandbox.replies import Reply, json_reply, method_not_allowed, plural_error
from plural_cancel.sandbox.reqlog import RequestLog
from plural_cancel.sandbox.request import Request
from plural_cancel.sandbox.state import LinkError, LinkStore
from plural_cancel.sandbox.tokens import TokenStore

_LINK_PATH = re.compile(r"/_admin/links/([^/]+)\Z")
_ACCOUNT_FAULTS_PATH = re.compile(r"/_admin/accounts/([^/]+)/faults\Z")


def _bad(message: str) -> Reply:
    return plural_error(400, "INVALID_REQUEST", message)


def _body(req: Request) -> Any:
    """The JSON body, ``{}`` when empty; ``ValueError`` when not JSON."""
    return req.json() if req.body.strip() else {}


class Admin:
    """Inspection and control of the sandbox, for tests and benchmarks."""

    def __init__(self, *, store: LinkStore, tokens: TokenStore, faults: FaultInjector,
                 log: RequestLog):
        self.store = store
        self.tokens = tokens
        self.faults = faults
        self.log = log
        self._routes = {
            "/_admin/health": {"GET": self._health},
            "/_admin/stats": {"GET": self._stats},
            "/_admin/requests": {"GET": self._requests, "DELETE": self._clear_requests},
            "/_admin/faults": {"GET": self._get_faults, "PUT": self._put_faults,
                               "DELETE": self._reset_faults},
            "/_admin/accounts": {"GET": self._accounts},
            "/_admin/revoke-tokens": {"POST": self._revoke},
            "/_admin/tokens": {"GET": self._tokens},
            "/_admin/links": {"POST": self._create_links},
            "/_admin/reset": {"POST": self._reset},
        }

    def handle(self, req: Request) -> Reply:
        methods = self._routes.get(req.path)
        args: tuple = ()
        if methods is None:
            match = _LINK_PATH.match(req.path)
            if match is not None:
                methods = {"GET": self._get_link, "PUT": self._put_link}
            else:
                match = _ACCOUNT_FAULTS_PATH.match(req.path)
                if match is None:
                    return plural_error(404, "NOT_FOUND", f"no such admin endpoint: {req.path}")
                methods = {"GET": self._get_account_faults, "PUT": self._put_account_faults,
                           "DELETE": self._reset_account_faults}
            args = (match.group(1),)
        handler = methods.get(req.method)
        if handler is None:
            return method_not_allowed(", ".join(methods))
        try:
            return handler(req, *args)
        except LinkError as err:
            return plural_error(err.http_status, err.code, err.message)
        except ValueError as err:
            return _bad(str(err))

    def _health(self, req: Request) -> Reply:
        return json_reply(200, {"status": "ok"})

    def _stats(self, req: Request) -> Reply:
        stats = self.store.stats()
        stats.update(requests_logged=len(self.log), live_tokens=len(self.tokens))
        return json_reply(200, stats)

    def _requests(self, req: Request) -> Reply:
        since = req.query.get("since", ["0"])[-1]
        if not since.isdigit():
            return _bad("since must be a non-negative integer")
        return json_reply(200, {"requests": self.log.since(int(since))})

    def _clear_requests(self, req: Request) -> Reply:
        self.log.clear()
        return json_reply(200, {"requests": []})

    def _get_faults(self, req: Request) -> Reply:
        return json_reply(200, self.faults.current.to_dict())

    def _put_faults(self, req: Request) -> Reply:
        return json_reply(200, self.faults.update(_body(req)).to_dict())

    def _reset_faults(self, req: Request) -> Reply:
        return json_reply(200, self.faults.reset().to_dict())

    def _accounts(self, req: Request) -> Reply:
        """The configured client ids (empty: any credentials are accepted) and the faults
        each account sets for itself."""
        return json_reply(200, {"accounts": self.tokens.accounts, "faults": self.faults.overrides()})

    def _account(self, account: str) -> str:
        if not self.tokens.is_account(account):
            raise ValueError(f"account {account!r} is not one of {', '.join(self.tokens.accounts)}")
        return account

    def _get_account_faults(self, req: Request, account: str) -> Reply:
        """The faults in force for the account's calls: the global ones with its own."""
        return json_reply(200, self.faults.for_account(self._account(account)).to_dict())

    def _put_account_faults(self, req: Request, account: str) -> Reply:
        """Partial update of the account's own faults (a field set to null follows the
        global one again); answers the faults now in force for it."""
        return json_reply(200, self.faults.update(_body(req), account=self._account(account)).to_dict())

    def _reset_account_faults(self, req: Request, account: str) -> Reply:
        """The account back to the global faults, its limit's count forgotten."""
        return json_reply(200, self.faults.reset(account=self._account(account)).to_dict())

    def _tokens(self, req: Request) -> Reply:
        """Every token issued so far, revoked and expired ones included (for leak checks)."""
        return json_reply(200, {"tokens": self.tokens.issued()})

    def _revoke(self, req: Request) -> Reply:
        return json_reply(200, {"revoked": self.tokens.revoke_all()})

    def _create_links(self, req: Request) -> Reply:
        body = _body(req)
        if not isinstance(body, dict):
            return _bad("body must be a JSON object")
        status = body.get("status", "CREATED")
        expire_at = None
        if body.get("expire_by") is not None:
            expire_at = parse_iso(body["expire_by"])
        if "id" in body:
            ids = [self.store.add(body["id"], status, expire_at=expire_at)]
        else:
            ids = self.store.add_many(body.get("count", 1), status, body.get("prefix"),
                                      expire_at=expire_at)
        return json_reply(200, {"ids": ids})

    def _get_link(self, req: Request, link_id: str) -> Reply:
        return json_reply(200, self.store.admin_view(link_id))

    def _put_link(self, req: Request, link_id: str) -> Reply:
        body = _body(req)
        if not isinstance(body, dict) or "status" not in body:
            return _bad('body must be {"status": "<link status>"}')
        return json_reply(200, self.store.set_status(link_id, body["status"]))

    def _reset(self, req: Request) -> Reply:
        """Back to start-up state: demo links only, empty log, no faults, no tokens."""
        body = _body(req)
        self.store.clear()
        if not isinstance(body, dict) or body.get("demo", True):
            self.store.seed_demo()
        self.log.clear()
        self.faults.reset()
        self.tokens.revoke_all()
        return json_reply(200, {"links": len(self.store)})
