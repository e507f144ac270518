"""Malformed messages: a cancel message's arguments read or refused, and the messages that
could not end as a record counted in Redis.

:func:`parse_arguments` reads a cancel message's arguments; :func:`refuse` ends one that
cannot run.

A message with a usable ``request_id`` ends as a ``failed`` / ``rejected`` record under
it; one without has nowhere to go but the log, so it is also counted here, per reason,
in one hash shared by every worker (``Keys.malformed``): the fleet-wide figure that
``plural-cancel stats`` and the ``plural_cancel_malformed_messages`` metric show.

The reasons are a small fixed set, so that a dashboard can list them and a typo cannot
grow the hash:

- ``undecodable``: a queue item that is not JSON (dropped by ``worker.broker``);
- ``not_a_task_message``: JSON that is not a kombu message (``worker.broker``), or a
  kombu message that is not a Celery task message (Celery's ``task_rejected``);
- ``unknown_task``: a Celery task message naming a task this worker does not have
  (Celery's ``task_unknown``);
- ``bad_arguments``: a cancel with unknown, missing or wrongly typed arguments and no
  usable ``request_id`` (none, or one taken by another cancel; counted by the cancel task);
- ``request_id_conflict``: a well-formed cancel whose ``request_id`` already names a
  cancel of another link, in the ledger or the schedule (a link that got a new id under
  an order's old Request-ID); also reported to Sentry with both links, since that link
  is not cancelled (counted by the cancel task).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import redis

from plural_cancel.errors import MalformedMessage
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys
from plural_cancel.worker.validation import validate_account_name, validate_payment_link_id, validate_request_id

if TYPE_CHECKING:
    from plural_cancel.worker.runtime import Runtime

# A refused message is a line of its cancel's path: under the cancel task's logger name.
log = logging.getLogger("plural_cancel.tasks.cancel")

UNDECODABLE = "undecodable"
NOT_A_TASK_MESSAGE = "not_a_task_message"
UNKNOWN_TASK = "unknown_task"
BAD_ARGUMENTS = "bad_arguments"
REQUEST_ID_CONFLICT = "request_id_conflict"

REASONS = (UNDECODABLE, NOT_A_TASK_MESSAGE, UNKNOWN_TASK, BAD_ARGUMENTS, REQUEST_ID_CONFLICT)
"""Every reason, in the order ``stats`` and the metric list them."""


def count(client: redis.Redis, keys: Keys, reason: str) -> int:
    """Count one malformed message under ``reason`` (one of :data:`REASONS`); returns the new
    fleet-wide count for that reason. Raises ``ValueError`` for any other reason and
    ``redis.RedisError`` when Redis does not answer."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {reason!r}")
    return client.hincrby(keys.malformed, reason, 1)


def counts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Malformed messages counted so far by every worker, per reason: every reason of
    :data:`REASONS`, 0 when none was seen."""
    seen = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in client.hgetall(keys.malformed).items()}
    return {reason: seen.get(reason, 0) for reason in REASONS}


ARGUMENTS = ("payment_link_id", "request_id", "account")
"""The cancel task's arguments, by keyword (or in this order by position); ``account`` may be
left out (the default account)."""


def parse_arguments(args: tuple, kwargs: dict) -> tuple[str, str, str]:
    """(payment_link_id, request_id, account) from a message's arguments, or :class:`MalformedMessage`.
    Whether the account is one the workers know is not a message's fault: ``worker.delivery``
    asks."""
    if len(args) > len(ARGUMENTS):
        raise MalformedMessage(f"{len(args)} positional arguments; the task takes {', '.join(ARGUMENTS)}")
    given = dict(zip(ARGUMENTS, args))
    twice = sorted(set(given) & set(kwargs))
    unknown = sorted(set(kwargs) - set(ARGUMENTS))
    if twice or unknown:
        names = ", ".join(str(name)[:40] for name in twice or unknown)
        raise MalformedMessage(f"{'arguments given twice' if twice else 'unknown arguments'}: {names}")
    given.update(kwargs)
    if given.get("account") is None:
        given["account"] = DEFAULT_ACCOUNT
    for name, check in (("payment_link_id", validate_payment_link_id), ("request_id", validate_request_id),
                        ("account", validate_account_name)):
        if name not in given:
            raise MalformedMessage(f"{name}: missing")
        try:
            check(given[name])
        except ValueError:
            # Not echoed: a value in the wrong field may be anything, personal data included.
            kind = type(given[name]).__name__
            raise MalformedMessage(f"{name}: must be a string of 1-50 allowed characters (got a {kind})") from None
    return given["payment_link_id"], given["request_id"], given["account"]


class Refusal(NamedTuple):
    """A malformed message's cancel, written ``failed`` / ``rejected`` (:func:`refuse`)."""

    request_id: str
    payment_link_id: str | None
    error: dict
    """Its ``last_error``: what was wrong with the message."""
    account: str | None = None
    """The message's account when it named a valid one (or none: the default)."""


def refuse(rt: Runtime, args: tuple, kwargs: dict, problem: MalformedMessage) -> Refusal | None:
    """A message that cannot run never vanishes: a ``failed`` / ``rejected`` record under its
    Request-ID when it has a usable one that is not taken (written by the one writer of an
    attempt's result, ``worker.attempts``; the caller reports it as it reports any failure),
    else a count (:data:`BAD_ARGUMENTS`) and None."""
    request_id, link_id = usable_ids(args, kwargs)
    account = usable_account(args, kwargs)
    error = {"http_status": None, "code": "MALFORMED_MESSAGE", "message": str(problem)}
    if request_id and rt.attempts.reject(request_id, link_id, error, account):
        log.error("cancel message refused: %s", problem, extra={"request_id": request_id, "payment_link_id": link_id,
                                                                 "account": account, "state": "failed",
                                                                 "outcome": "rejected"})
        return Refusal(request_id, link_id, error, account)
    count(rt.redis, rt.keys, BAD_ARGUMENTS)
    log.error("cancel message dropped: %s (no usable request_id that is not already taken; counted as "
              "malformed)", problem)
    return None


def usable_ids(args: tuple, kwargs: dict) -> tuple[str | None, str | None]:
    """(request_id, payment_link_id) of a message, each None unless it is a valid id: a value
    in the wrong field may be anything, personal data included, and is never repeated."""
    given = {**dict(zip(ARGUMENTS, args)), **kwargs}
    request_id, link_id = given.get("request_id"), given.get("payment_link_id")
    return (request_id if _valid(validate_request_id, request_id) else None,
            link_id if _valid(validate_payment_link_id, link_id) else None)


def usable_account(args: tuple, kwargs: dict) -> str | None:
    """A message's account when it names a valid one (or none at all: the default), else None."""
    given = {**dict(zip(ARGUMENTS, args)), **kwargs}
    account = given.get("account")
    if account is None:
        return DEFAULT_ACCOUNT
    return account if _valid(validate_account_name, account) else None


def _valid(check, value) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True
