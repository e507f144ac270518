"""The ledger: one status record per Request-ID, and the sets that keep every cancel moving.

Each change that touches more than one key is one Lua script, so a crash between two
Redis writes can never leave a cancel half-recorded:

- ``create``: the record and its outbox entry appear together, or not at all.
- ``claim``: a delivery takes the per-link lock and the record's lease together.
- ``finish``: outcome, dead-letter set, outcome stream and lock release together.
- ``defer``: the record turns ``retrying`` and enters the due-time set together.
- ``requeue``: a dead letter turns ``queued`` with a fresh budget and enters the outbox together.

Each script that changes a state also keeps the counts ``plural-cancel stats`` reads
(see :meth:`Ledger.stats`), so counting never scans the records.

Timestamps are epoch seconds (floats) in Redis and ISO 8601 in :meth:`Ledger.status`.
No customer personal data is ever written here: only ids, statuses, amounts and
Plural's error code and message.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import redis

from worker.keys import Keys
from worker.ledger_lua import CLAIM, CREATE, DEFER, FINISH, RELEASE_HELD, REQUEUE, TAKE_DUE

TERMINAL = ("succeeded", "failed")
ACTIVE = ("queued", "running", "retrying")
STATS_BUCKET = 3600
"""Seconds of finishes counted in one ``finished`` hash (outcome -> records)."""
STREAM_MAXLEN = 100_000
"""Outcome events kept in the stream (approximately: trimmed with ``~``)."""


class RequestIdConflict(ValueError):
    """The Request-ID is already used for a cancel of another payment link."""


@dataclass(frozen=True)
class Claim:
    """What :meth:`Ledger.claim` decided for one delivery."""

    verdict: str
    """``claimed``, ``terminal``, ``early``, ``busy`` or ``mismatch``."""
    attempts: int = 0
    deadline: float = 0.0
    """Epoch seconds after which no new attempt may start (the retry budget)."""
    wait: float = 0.0
    """For ``busy``: seconds until the other holder's lock runs out."""


class Ledger:
    """Status records, leases, the deferred set, dead letters and the outcome stream."""

    def __init__(self, client: redis.Redis, *, result_ttl: int, retry_budget: float,
                 keys: Keys = Keys(), clock: Callable[[], float] = time.time):
        self.redis = client
        self.keys = keys
        self.result_ttl = result_ttl
        self.retry_budget = retry_budget
        self.clock = clock
        self._create = client.register_script(CREATE)
        self._claim = client.register_script(CLAIM)
        self._finish = client.register_script(FINISH)
        self._defer = client.register_script(DEFER)
        self._take_due = client.register_script(TAKE_DUE)
        self._release_held = client.register_script(RELEASE_HELD)
        self._requeue = client.register_script(REQUEUE)

    # -- producers -------------------------------------------------------------------

    def create_many(self, items: Iterable[tuple[str, str]]) -> list[int]:
        """Create records for (request_id, payment_link_id) pairs in one pipeline.

        Returns one code per pair: 1 created (publish it), 0 already there (publish
        nothing), -1 the Request-ID belongs to another link.
        """
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        for request_id, link_id in items:
            self._create(keys=[self.keys.record(request_id), self.keys.outbox, self.keys.stats],
                         args=[request_id, link_id, repr(now), self.result_ttl, repr(now + self.retry_budget)],
                         client=pipe)
        return [int(code) for code in pipe.execute()]

    def mark_published(self, request_ids: Iterable[str]) -> None:
        """The messages of these records have left: take them out of the outbox."""
        ids = list(request_ids)
        if ids:
            self.redis.zrem(self.keys.outbox, *ids)

    # -- the worker ------------------------------------------------------------------

    def claim(self, request_id: str, payment_link_id: str, owner: str, lease: float) -> Claim:
        """Take this cancel for one attempt: the per-link lock and a lease of ``lease`` seconds."""
        keys, args = self.claim_call(request_id, payment_link_id, owner, lease)
        return parse_claim(self._claim(keys=keys, args=args))

    def claim_call(self, request_id: str, payment_link_id: str, owner: str,
                   lease: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the claim script (``CLAIM_FN``), for :meth:`claim` and ``worker.admission``."""
        now = self.clock()
        keys = [self.keys.record(request_id), self.keys.link_lock(payment_link_id), self.keys.leases,
                self.keys.deferred, self.keys.outbox, self.keys.stats]
        return keys, [request_id, payment_link_id, repr(now), lease, owner, self.result_ttl,
                      repr(now + self.retry_budget)]

    def finish(self, request_id: str, payment_link_id: str, owner: str, *, state: str, outcome: str,
               attempted: bool, link_status: str | None = None, cancelled_at: str | None = None,
               amount: dict | None = None, last_error: dict | None = None) -> int:
        """Record a terminal outcome, append it to the outcome stream; returns the attempts made."""
        keys, args = self.finish_call(request_id, payment_link_id, owner, state=state, outcome=outcome,
                                      attempted=attempted, link_status=link_status, cancelled_at=cancelled_at,
                                      amount=amount, last_error=last_error)
        return int(self._finish(keys=keys, args=args))

    def finish_call(self, request_id: str, payment_link_id: str, owner: str, *, state: str, outcome: str,
                    attempted: bool, link_status: str | None = None, cancelled_at: str | None = None,
                    amount: dict | None = None, last_error: dict | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the finish script (``FINISH_FN``), for :meth:`finish` and ``worker.attempts``."""
        fields = {"state": state, "outcome": outcome}
        if link_status:
            fields["link_status"] = link_status
        if cancelled_at:
            fields["cancelled_at"] = cancelled_at
        if amount:
            fields["amount"] = json.dumps(amount, separators=(",", ":"))
        if last_error:
            fields["last_error"] = json.dumps(last_error, separators=(",", ":"))
        keys = [self.keys.record(request_id), self.keys.link_lock(payment_link_id), self.keys.leases,
                self.keys.failed, self.keys.events, self.keys.stats, self.keys.finished("")]
        return keys, [request_id, owner, repr(self.clock()), self.result_ttl, int(attempted), STREAM_MAXLEN,
                      json.dumps(fields), STATS_BUCKET]

    def defer(self, request_id: str, payment_link_id: str, owner: str, *, due: float, attempted: bool,
              last_error: dict | None = None) -> int:
        """Park this cancel until ``due`` (epoch seconds) in Redis, not in worker memory.

        ``attempted``: Plural was called (the attempt counts). A cancel held back before
        any attempt stays ``queued``; one that has been tried is ``retrying``. Returns the
        attempts made.
        """
        keys, args = self.defer_call(request_id, payment_link_id, owner, due=due, attempted=attempted,
                                     last_error=last_error)
        return int(self._defer(keys=keys, args=args))

    def defer_call(self, request_id: str, payment_link_id: str, owner: str, *, due: float, attempted: bool,
                   last_error: dict | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the defer script (``DEFER_FN``), for :meth:`defer` and ``worker.attempts``."""
        keys = [self.keys.record(request_id), self.keys.link_lock(payment_link_id), self.keys.leases,
                self.keys.deferred, self.keys.stats]
        error = json.dumps(last_error, separators=(",", ":")) if last_error else ""
        return keys, [request_id, owner, repr(self.clock()), repr(due), int(attempted), error]

    def park(self, request_id: str, due: float) -> None:
        """Bring a copy that could not run (its link is busy) back at ``due``, state untouched."""
        self.redis.zadd(self.keys.deferred, {request_id: due})

    # -- periodic work ---------------------------------------------------------------

    def take_due(self, zset: str, *, upto: float, limit: int, hold_until: float) -> list[tuple[str, str]]:
        """Hold members of ``zset`` scored up to ``upto`` until ``hold_until``; returns (request_id, link).

        A process that dies before :meth:`release_held` leaves them to come due again
        at ``hold_until``: nothing is lost, at worst a message is published twice.
        """
        flat = self._take_due(keys=[zset, self.keys.record("")],
                              args=[repr(upto), limit, repr(hold_until)])
        pairs = [_text(x) for x in flat]
        return list(zip(pairs[0::2], pairs[1::2]))

    def release_held(self, zset: str, request_ids: list[str], held_score: float) -> None:
        """Forget members taken with :meth:`take_due` once their messages are published."""
        if request_ids:
            self._release_held(keys=[zset], args=[repr(held_score), *request_ids])

    # -- dead letters and counts ------------------------------------------------------

    def failed(self, limit: int = 0) -> list[dict[str, Any]]:
        """Status records of dead letters (state ``failed``), latest first; ``limit`` 0: all."""
        ids = self.redis.zrevrange(self.keys.failed, 0, limit - 1 if limit > 0 else -1)
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(self.keys.record(_text(rid)))
        # A record may have expired since it failed (FINISH prunes those from the set later).
        return [format_record({_text(k): _text(v) for k, v in raw.items()}) for raw in pipe.execute() if raw]

    def requeue(self, request_ids: Iterable[str]) -> list[tuple[str, str, str]]:
        """Dead letters back to ``queued`` (deadline now + ``retry_budget`` s, attempts kept) and
        into the outbox: publish, then :meth:`mark_published`. Returns (request_id, verdict, link),
        verdict ``requeued``, ``missing`` or ``not_failed``."""
        ids, now = list(request_ids), self.clock()
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            self._requeue(keys=[self.keys.record(rid), self.keys.failed, self.keys.outbox, self.keys.stats,
                                self.keys.finished("")],
                          args=[rid, repr(now), repr(now + self.retry_budget), self.result_ttl, STATS_BUCKET],
                          client=pipe)
        return [(rid, _text(verdict), _text(link)) for rid, (verdict, link) in zip(ids, pipe.execute())]

    def stats(self) -> dict[str, Any]:
        """``{"active": {queued|running|retrying: n}, "outcomes": {outcome: n}, "deferred": n,
        "dead_letters": n}`` from counters, never a scan. ``outcomes`` counts the records that
        finished within the last ``result_ttl`` seconds (those still readable) in hourly
        hashes: the oldest may count up to ``STATS_BUCKET`` seconds of just-expired ones."""
        now, pipe = self.clock(), self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.stats).zcard(self.keys.deferred).zcard(self.keys.failed)
        for bucket in range(int((now - self.result_ttl) // STATS_BUCKET) * STATS_BUCKET, int(now) + 1, STATS_BUCKET):
            pipe.hgetall(self.keys.finished(bucket))
        active, deferred, dead, *hours = pipe.execute()
        outcomes: Counter[str] = Counter()
        for hour in hours:
            outcomes.update({_text(k): int(v) for k, v in hour.items()})
        # Counters dip below zero for records that predate them; never show that.
        return {"active": {state: max(0, int(active.get(state.encode(), 0))) for state in ACTIVE},
                "outcomes": {k: n for k, n in sorted(outcomes.items()) if n > 0},
                "deferred": deferred, "dead_letters": dead}

    # -- reading ---------------------------------------------------------------------

    def status(self, request_id: str) -> dict[str, Any] | None:
        """The status record as CONTRACT.md shows it, or None when unknown or expired."""
        raw = self.redis.hgetall(self.keys.record(request_id))
        if not raw:
            return None
        return format_record({_text(k): _text(v) for k, v in raw.items()})


def parse_claim(reply: list) -> Claim:
    """The :class:`Claim` a claim script (``CLAIM_FN``) answered."""
    verdict = _text(reply[0])
    if verdict == "claimed":
        return Claim("claimed", attempts=int(reply[1]), deadline=float(reply[2]))
    if verdict == "busy":
        return Claim("busy", wait=max(0.1, float(reply[1])))
    return Claim(verdict)


def format_record(raw: dict[str, str]) -> dict[str, Any]:
    """A record's hash fields as the public status dictionary."""
    def iso(field: str) -> str | None:
        value = raw.get(field)
        if not value:
            return None
        return datetime.fromtimestamp(float(value), timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    return {
        "request_id": raw.get("request_id"),
        "payment_link_id": raw.get("payment_link_id"),
        "state": raw.get("state"),
        "outcome": raw.get("outcome") or None,
        "link_status": raw.get("link_status") or None,
        "attempts": int(raw.get("attempts") or 0),
        "next_attempt_at": iso("next_attempt_at"),
        "last_error": json.loads(raw["last_error"]) if raw.get("last_error") else None,
        "amount": json.loads(raw["amount"]) if raw.get("amount") else None,
        "created_at": iso("created_at"),
        "updated_at": iso("updated_at"),
        "cancelled_at": raw.get("cancelled_at") or None,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
