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
from typing import Any, Callable, Iterable

import redis

from worker.keys import Keys
from worker.ledger_lua import CLAIM, CREATE, DEFER, FINISH, RELEASE_HELD, REQUEUE, TAKE_DUE
from worker.links import format_timestamp

TERMINAL = ("succeeded", "failed")
ACTIVE = ("queued", "running", "retrying")
STATS_BUCKET = 3600
"""Seconds of finishes counted in one ``finished`` hash (outcome -> records)."""
STREAM_MAXLEN = 100_000
"""Outcome events kept in the stream (approximately: trimmed with ``~``)."""
READ_CHUNK = 1000
"""Records read per round trip by :meth:`Ledger.statuses`."""


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
        """KEYS and ARGV of the claim script (``CLAIM_FN``), for :meth:`claim` and ``worker.attempts``."""
        now = self.clock()
        keys = [self.keys.record(request_id), self.keys.link_lock(payment_link_id), self.keys.leases,
                self.keys.deferred, self.keys.outbox, self.keys.stats]
        return keys, [request_id, payment_link_id, repr(now), lease, owner, self.result_ttl,
                      repr(now + self.retry_budget)]

    def finish(self, request_id: str, payment_link_id: str, owner: str, **fields: Any) -> int:
        """Record a terminal outcome (``fields`` as :meth:`finish_call` takes them), append it to
        the outcome stream; returns the attempts made."""
        keys, args = self.finish_call(request_id, payment_link_id, owner, **fields)
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

    def defer(self, request_id: str, payment_link_id: str, owner: str, **fields: Any) -> int:
        """Park this cancel in Redis, not in worker memory, until its due time (``fields`` as
        :meth:`defer_call` takes them); returns the attempts made."""
        keys, args = self.defer_call(request_id, payment_link_id, owner, **fields)
        return int(self._defer(keys=keys, args=args))

    def defer_call(self, request_id: str, payment_link_id: str, owner: str, *, due: float, attempted: bool,
                   last_error: dict | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the defer script (``DEFER_FN``), for :meth:`defer` and ``worker.attempts``.

        ``due``: epoch seconds. ``attempted``: Plural was called (the attempt counts). A
        cancel held back before any attempt stays ``queued``; one that has been tried is
        ``retrying``.
        """
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
        pairs = [as_text(x) for x in flat]
        return list(zip(pairs[0::2], pairs[1::2]))

    def release_held(self, zset: str, request_ids: list[str], held_score: float) -> None:
        """Forget members taken with :meth:`take_due` once their messages are published."""
        if request_ids:
            self._release_held(keys=[zset], args=[repr(held_score), *request_ids])

    # -- dead letters and counts ------------------------------------------------------

    def failed(self, limit: int = 0) -> list[dict[str, Any]]:
        """Status records of dead letters (state ``failed``), latest first; ``limit`` 0: all."""
        ids = self.redis.zrevrange(self.keys.failed, 0, limit - 1 if limit > 0 else -1)
        # A record may have expired since it failed (FINISH prunes those from the set later).
        return [record for record in self.statuses([as_text(rid) for rid in ids]) if record]

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
        return [(rid, as_text(verdict), as_text(link)) for rid, (verdict, link) in zip(ids, pipe.execute())]

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
            outcomes.update({as_text(k): int(v) for k, v in hour.items()})
        # Counters dip below zero for records that predate them; never show that.
        return {"active": {state: max(0, int(active.get(state.encode(), 0))) for state in ACTIVE},
                "outcomes": {k: n for k, n in sorted(outcomes.items()) if n > 0},
                "deferred": deferred, "dead_letters": dead}

    # -- reading ---------------------------------------------------------------------

    def status(self, request_id: str) -> dict[str, Any] | None:
        """The status record as CONTRACT.md shows it, or None when unknown or expired."""
        return self.statuses([request_id])[0]

    def statuses(self, request_ids: list[str]) -> list[dict[str, Any] | None]:
        """:meth:`status` of many cancels, in order, one round trip per ``READ_CHUNK``."""
        out: list[dict[str, Any] | None] = []
        for start in range(0, len(request_ids), READ_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for request_id in request_ids[start:start + READ_CHUNK]:
                pipe.hgetall(self.keys.record(request_id))
            out += [format_record({as_text(k): as_text(v) for k, v in raw.items()}) if raw else None
                    for raw in pipe.execute()]
        return out


def parse_claim(reply: list) -> Claim:
    """The :class:`Claim` a claim script (``CLAIM_FN``) answered."""
    verdict = as_text(reply[0])
    if verdict == "claimed":
        return Claim("claimed", attempts=int(reply[1]), deadline=float(reply[2]))
    if verdict == "busy":
        return Claim("busy", wait=max(0.1, float(reply[1])))
    return Claim(verdict)


def format_record(raw: dict[str, str]) -> dict[str, Any]:
    """A record's hash fields as the public status dictionary."""
    return {
        "request_id": raw.get("request_id"),
        "payment_link_id": raw.get("payment_link_id"),
        "state": raw.get("state"),
        "outcome": raw.get("outcome") or None,
        "link_status": raw.get("link_status") or None,
        "attempts": int(raw.get("attempts") or 0),
        "next_attempt_at": stored_time(raw.get("next_attempt_at")),
        "last_error": json.loads(raw["last_error"]) if raw.get("last_error") else None,
        "amount": json.loads(raw["amount"]) if raw.get("amount") else None,
        "created_at": stored_time(raw.get("created_at")),
        "updated_at": stored_time(raw.get("updated_at")),
        "cancelled_at": raw.get("cancelled_at") or None,
    }


def stored_time(value: str | None) -> str | None:
    """A time stored as epoch seconds (text) as ISO 8601 UTC; None when absent or empty."""
    return format_timestamp(float(value)) if value else None


def as_text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
