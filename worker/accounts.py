"""The accounts the workers know, published in Redis for producers and the pump.

Each worker reads the accounts file (``config.accounts.AccountBook``) and writes the names
of the accounts in force, each with its rate limit, to one hash (``Keys.accounts``): at
start, after every reload and every ``REPUBLISH_EVERY`` seconds; never a secret. A
producer host then needs no file to check a name (:func:`check_account`), and the pump
reads each account's rate from the same hash (``worker.ledger_lua``'s ``PUMP``).

Several workers write the hash: each writes what its own file says, so for the minute a
changed file takes to reach them all, the last writer wins.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis

from plural_cancel.config.accounts import Account
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys
from plural_cancel.worker.validation import validate_account_name

if TYPE_CHECKING:
    from plural_cancel.worker.runtime import Runtime

REPUBLISH_EVERY = 30.0
"""Seconds between two writes of the hash by one worker when nothing changed: a worker of
an older file that wrote last is put right within this."""

SHOWN_NAMES = 20
"""Most account names an unknown account's error lists."""


def publish(client: redis.Redis, keys: Keys, accounts: dict[str, Account]) -> None:
    """Make the published accounts ``accounts`` (name -> rate limit): every name set first,
    then the names no longer in force removed, so that no moment shows an account in force
    missing. No MULTI: a Redis refusing writes (``NOREPLICAS``, ``OOM``) then answers with its
    own error, which the pump's tick rides out as it does for its other steps."""
    current = {name: repr(account.rate_limit) for name, account in accounts.items()}
    stale = [name for name in client.hkeys(keys.accounts) if name.decode() not in current]
    pipe = client.pipeline(transaction=False)
    if current:
        pipe.hset(keys.accounts, mapping=current)
    if stale:
        pipe.hdel(keys.accounts, *stale)
    pipe.execute()


def refresh(rt: Runtime) -> bool:
    """Read the accounts file again if it changed, and publish the accounts in force when
    they changed or ``REPUBLISH_EVERY`` seconds have passed. Run by every worker's pump
    (``worker.app.DuePump``); returns True when the accounts changed since the last call.

    Changed by the book's ``generation``, not by what this look found: a delivery that met
    an unknown name may have read the file already (``AccountBook.get``)."""
    book = rt.book
    book.refresh()
    changed = book.generation != rt.accounts_generation
    now = time.monotonic()
    if rt.accounts_published_at is None:
        rt.ledger.seed_account_stats()  # the first publication ever: an upgrade's live records are default's
    if changed:
        rt.redactor.learn(account.client_secret.reveal() for account in book.accounts().values())
        rt.accounts_generation = book.generation
    if changed or rt.accounts_published_at is None or now - rt.accounts_published_at >= REPUBLISH_EVERY:
        publish(rt.redis, rt.keys, book.accounts())
        rt.accounts_published_at = now
    return changed


KNOWN_FOR = 5.0
"""Seconds a process takes an account it found published as known without asking again (one
round trip saved per enqueue; an account removed meanwhile ends its cancels ``rejected``
at the worker)."""


def check_account(rt: Runtime, account: str | None) -> str:
    """``account`` (None: the default one) if the workers know it, else ``ValueError`` naming
    ``account``. Known: published by the workers, or in this process's own accounts file;
    before any worker has published, the default account is taken as known (a producer
    started before its workers, as before accounts)."""
    name = DEFAULT_ACCOUNT if account is None else validate_account_name(account)
    now = time.monotonic()
    if rt.known_accounts.get(name, 0.0) > now:
        return name
    pipe = rt.redis.pipeline(transaction=False)
    found, any_published = pipe.hexists(rt.keys.accounts, name).exists(rt.keys.accounts).execute()
    local = rt.local_accounts()
    if found or name in local or (name == DEFAULT_ACCOUNT and not any_published and not local):
        rt.known_accounts[name] = now + KNOWN_FOR
        return name
    known = sorted(set(rt.published_accounts()) - ({DEFAULT_ACCOUNT} if not any_published else set()) | set(local))
    shown = ", ".join(known[:SHOWN_NAMES]) + (", ..." if len(known) > SHOWN_NAMES else "")
    raise ValueError(f"account: {name!r} is not an account the workers know "
                     f"({'known: ' + shown if known else 'none is published yet'}; see PLURAL_ACCOUNTS_FILE)")
