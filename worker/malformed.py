"""Messages that reached a worker malformed and could not end as a record: counted in Redis.

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

import redis

from plural_cancel.worker.keys import Keys

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
