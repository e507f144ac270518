"""The ledger: one status record per Request-ID, and the index that keeps every live cancel moving.

Each change that touches more than one key is one Lua script (``worker.ledger_lua``),
so a crash between two Redis writes can never leave a cancel half-recorded:

- ``create``: the record appears and enters the due index (or, for a bulk enqueue, the
  backlog), or follows its link's live cancel.
- ``claim``: a delivery takes the cancel for one attempt, under a lease (its owner token).
- ``finish``: outcome, dead-letter set, outcome stream, the link freed and its followers ended,
  and each ended record's callback, if it names one, pending in the callbacks index.
- ``defer``: the record waits for its due time in the index.
- ``pump``: cancels whose time has come (or whose message vanished) go back to the queue,
  and held ones from the backlog as far as the fleet has room for them.
- ``requeue``: a dead letter turns ``queued`` with a fresh budget.
- ``take_callbacks`` / ``callbacks_sent``: pending callbacks out to their senders, under a
  lease, and out of the index once sent (``worker.publisher.send_callbacks``).

Only the delivery that holds a cancel (its owner token, set by the claim) can finish
or defer it: a delivery whose lease ran out and was taken over writes nothing.

Each script that changes a state also keeps the counts ``plural-cancel stats`` reads
(see :meth:`Ledger.stats`), so counting never scans the records.

Timestamps are epoch seconds (floats) of Redis's clock in Redis, ISO 8601 in
:meth:`Ledger.status`. No customer personal data is ever written here: only ids,
statuses, amounts and Plural's error code and message.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import redis

from plural_cancel.worker import ledger_lua as lua
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys, account_arg
from plural_cancel.worker.links import format_timestamp
from plural_cancel.worker.redaction import Redactor
from plural_cancel.worker.replication import ReplicaWait

ACTIVE = ("queued", "running", "retrying")
STATS_BUCKET = 3600
"""Seconds of finishes counted in one ``finished`` hash (outcome -> records)."""

READ_CHUNK = 1000
"""Records read per round trip by :meth:`Ledger.statuses`."""
CREATE_CHUNK = 1000
"""Records created per script call by :meth:`Ledger.create_many` (a call holds Redis while it runs)."""
STALE = -1
"""What finish and defer answer when the delivery no longer holds the cancel."""


class Created(enum.IntEnum):
    """What creating one cancel's record came to: the codes of the ledger's ``CREATE_FN``,
    read here and nowhere else (producers, the schedule's firing)."""

    CONFLICT = -1
    """The Request-ID names another link's cancel, in the ledger or the schedule: nothing written."""
    EXISTS = 0
    """The same cancel (Request-ID and link) exists already: nothing written, nothing to send."""
    CREATED = 1
    """A new record that leads its link: its message is to be sent (unless held in the backlog)."""
    FOLLOWING = 2
    """A new record following its link's live cancel: it ends with that one, nothing to send."""

    @property
    def publish(self) -> bool:
        """Whether the new cancel's message is the creator's to send (unless held)."""
        return self is Created.CREATED

    @property
    def fired(self) -> str:
        """A scheduled cancel created this way, as ``get_schedule`` names it (its ``result``)."""
        return _FIRED[self]


_FIRED = {Created.CREATED: "enqueued", Created.FOLLOWING: "following", Created.EXISTS: "already_enqueued",
          Created.CONFLICT: "conflict"}


@dataclass(frozen=True)
class Callback:
    """A producer's own Celery task, sent one message when its cancel ends."""

    task: str
    """The task's registered name, e.g. ``orders.on_cancel_outcome``."""
    queue: str
    """The queue the producer's workers consume, e.g. ``orders``."""


@dataclass(frozen=True)
class PendingCallback:
    """A callback taken for sending (:meth:`Ledger.take_callbacks`)."""

    request_id: str
    callback: Callback
    status: dict[str, Any]
    """The ended cancel's status record (:meth:`Ledger.status`): its one argument, ``status``."""
    task_id: str
    """The same for every copy of this ending (a receiver dedupes by it); another ending of
    the same Request-ID (a dead letter retried) has another."""
    lease: str
    """Redis's time the entry is due again unless confirmed sent (:meth:`Ledger.callbacks_sent`)."""


@dataclass(frozen=True)
class Claim:
    """What the claim decided for one delivery."""

    verdict: str
    """``claimed``; or, dropping this copy: ``terminal``, ``following``, ``held``, ``early``,
    ``mismatch``; or ``gave_up`` (claimed, its budget spent, and ended by the admission)."""
    attempts: int = 0
    budget_left: float = 0.0
    """Seconds of the retry budget left when claimed."""
    throttles: int = 0
    """Of ``attempts``, those Plural throttled."""
    last_error: dict | None = None
    """For ``gave_up``: the record's last error."""
    link_status: str | None = None
    """For ``gave_up``: the link's last known status."""
    age: float | None = None
    """For ``gave_up``: seconds from the record's ``created_at`` to its end (Redis's clock)."""
    link: str | None = None
    """For ``mismatch``: the link the Request-ID belongs to (in the ledger or the schedule)."""


class Ledger:
    """Status records, the due index, dead letters and the outcome stream.

    ``stall_timeout``: seconds a live cancel may go without being taken before its
    message is sent again (more when the queue has a backlog); ``rate``: the rate
    limit (per second) that backlog drains at; ``queue``: the broker's list.
    """

    def __init__(self, client: redis.Redis, *, result_ttl: int, stall_timeout: float,
                 rate: float, queue: str, keys: Keys = Keys(), clock: Callable[[], float] = time.time,
                 redactor: Redactor = Redactor(), replicas: ReplicaWait | None = None,
                 outcome_retention: int | None = None):
        self.redis = client
        self.outcome_retention = outcome_retention or result_ttl
        """Seconds an outcome event stays on the stream (``OUTCOME_RETENTION``): trimmed by age only."""
        self.replicas = replicas or ReplicaWait(client, 0, keys=keys)
        """How a producer's writes (:meth:`create_many`, :meth:`requeue`) wait for replicas."""
        self.redactor = redactor
        """Masks secrets and personal data in an error before it is written (Plural's own
        message may quote what it was sent: a phone number, an e-mail)."""
        self.keys = keys
        self.result_ttl = result_ttl
        self.stall_timeout = stall_timeout
        self.rate = rate
        self.queue = queue
        self.clock = clock
        """Host clock, for choosing which hourly counters to read only: every due time,
        lease and hold is decided by Redis's clock inside the scripts."""
        self._create_many = client.register_script(lua.CREATE_MANY)
        self._pump = client.register_script(lua.PUMP)
        self._requeue = client.register_script(lua.REQUEUE)
        self._reject = client.register_script(lua.REJECT)
        self._take_callbacks = client.register_script(lua.TAKE_CALLBACKS)
        self._callbacks_sent = client.register_script(lua.CALLBACKS_SENT)
        self._oldest_live = client.register_script(lua.OLDEST_LIVE)
        self._seed_account_stats = client.register_script(lua.SEED_ACCOUNT_STATS)
        self._forget_idle_account = client.register_script(lua.FORGET_IDLE_ACCOUNT)

    def _error_json(self, error: dict) -> str:
        return json.dumps(self.redactor.walk(error), separators=(",", ":"))

    # -- producers -------------------------------------------------------------------

    def create_call(self, request_id: str, payment_link_id: str,
                    account: str = DEFAULT_ACCOUNT) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``CREATE_FN`` for one cancel with no callback, not held (how a
        claim creates the record of a message sent by name)."""
        k = self.keys
        return ([k.record(request_id), k.link(payment_link_id, account), k.due, k.stats, k.schedule_ids, self.queue,
                 k.record(""), k.followers(""), k.backlog, k.backlogs, k.live],
                [request_id, payment_link_id, repr(self.stall_timeout), repr(self.rate), "", "",
                 account_arg(account)])

    def create_many(self, items: Iterable[tuple[str, str]], callback: Callback | None = None, *,
                    hold: bool = False, account: str = DEFAULT_ACCOUNT) -> list[Created]:
        """Create records for (request_id, payment_link_id) pairs, ``CREATE_CHUNK`` per script
        call in one pipeline, each with ``callback`` (a record created already keeps the
        callback it was created with).

        ``hold``: the new cancels wait in their account's backlog until a pump has room for
        them (:meth:`take_due`); otherwise they are due at once and their messages are the
        caller's to publish. Every pair is a cancel of ``account``.

        Returns what became of each pair (:class:`Created`).
        """
        items = list(items)
        keys = self.batch_keys()
        head = [repr(self.stall_timeout), repr(self.rate), callback.task if callback else "",
                callback.queue if callback else "", int(hold), account_arg(account)]
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(items), CREATE_CHUNK):
            args = head + [x for pair in items[start:start + CREATE_CHUNK] for x in pair]
            self._create_many(keys=keys, args=args, client=pipe)
        # In the same pipeline, so on the connection that wrote the records: WAIT counts
        # the replicas that have everything this connection wrote.
        token = self.replicas.extend(pipe)
        replies = self.replicas.check(pipe.execute(), token)
        return [Created(int(code)) for codes in replies for code in codes]

    def batch_keys(self) -> list[str]:
        """The keys of a batch of ``CREATE_FN`` calls (``CREATE_MANY``; ``worker.schedule``'s
        ``FIRE``): due, stats, schedule ids, the queue, the record, followers and link key
        prefixes, the backlog, the backlogs set, the live index."""
        k = self.keys
        return [k.due, k.stats, k.schedule_ids, self.queue, k.record(""), k.followers(""), k.link(""), k.backlog,
                k.backlogs, k.live]

    # -- the worker (through ``worker.attempts``, which runs these in two round trips) --

    def claim_call(self, request_id: str, payment_link_id: str, owner: str, lease: float,
                   budget: float, account: str = DEFAULT_ACCOUNT) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the claim script (``CLAIM_FN``): ``lease`` and the retry ``budget``
        (the retry policy's: from the first attempt) in seconds."""
        keys, args = self.create_call(request_id, payment_link_id, account)
        return keys, [*args, owner, repr(lease), repr(budget)]

    def finish_call(self, request_id: str, payment_link_id: str, owner: str, *, state: str, outcome: str,
                    attempted: bool, link_status: str | None = None, cancelled_at: str | None = None,
                    amount: dict | None = None, last_error: dict | None = None,
                    account: str = DEFAULT_ACCOUNT) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the finish script (``FINISH_FN``)."""
        fields = {"state": state, "outcome": outcome}
        if link_status:
            fields["link_status"] = link_status
        if cancelled_at:
            fields["cancelled_at"] = cancelled_at
        if amount:
            fields["amount"] = json.dumps(amount, separators=(",", ":"))
        if last_error:
            fields["last_error"] = self._error_json(last_error)
        k = self.keys
        keys = [k.record(request_id), k.link(payment_link_id, account), k.due, k.failed, k.events, k.stats,
                k.finished(""), k.followers(request_id), k.record(""), k.callbacks, k.live]
        return keys, [request_id, owner, self.result_ttl, int(attempted), self.outcome_retention,
                      json.dumps(fields), STATS_BUCKET]

    def defer_call(self, request_id: str, owner: str, *, delay: float, attempted: bool,
                   last_error: dict | None = None, throttled: bool = False) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the defer script (``DEFER_FN``).

        ``delay``: seconds from now (Redis's clock). ``attempted``: Plural was called
        (the attempt counts). A cancel held back before any attempt stays ``queued``; one
        that has been tried is ``retrying``. ``throttled``: Plural throttled the attempt (the
        record counts ``throttles``, which a failure's backoff leaves out).
        """
        error = self._error_json(last_error) if last_error else ""
        return ([self.keys.record(request_id), self.keys.due, self.keys.stats],
                [request_id, owner, repr(max(0.0, delay)), int(attempted), error, int(throttled)])

    def reject(self, request_id: str, payment_link_id: str | None, error: dict,
               account: str | None = None) -> bool:
        """End a malformed message's cancel ``failed`` / ``rejected`` under its Request-ID, with
        ``error`` as its last error (and ``account``, when the message named a valid one);
        False (nothing written) when that Request-ID is taken: it has a record, or a scheduled
        cancel will carry it."""
        keys, args = self.finish_call(request_id, payment_link_id or "", "", state="failed", outcome="rejected",
                                      attempted=False, last_error=error)
        return bool(int(self._reject(keys=[*keys, self.keys.schedule_ids],
                                     args=[*args, payment_link_id or "", account_arg(account or DEFAULT_ACCOUNT)])))

    # -- periodic work ---------------------------------------------------------------

    def take_due(self, limit: int, *, ahead: float = 0.0, rate: float | None = None,
                 pacing: float = 1.0) -> list[tuple[str, ...]]:
        """Live cancels to publish now, as (request_id, link), or (request_id, link, account)
        for an account but the default one (as ``worker.publisher.publish`` takes them): up to
        ``limit`` whose time has come, then, with ``ahead`` seconds, each account's turn at its
        backlog: held ones (oldest first) until ``ahead`` seconds of its work at its pace are
        queued or running (at least one when none is). An account's pace is its published rate
        limit (``Keys.accounts``) times ``pacing``, as its throttling leaves it; ``rate`` (per
        second; the configured rate unless given) stands for an account not published. None
        from an account's backlog while its breaker is open and not yet due to reopen.

        They stay in the index, due again once the stall timeout (and the queue's
        backlog) has passed: if their message is lost too, they come back again.
        """
        k = self.keys
        flat = self._pump(keys=[k.due, k.record(""), self.queue, k.backlog, k.stats, k.breaker, k.link(""),
                                k.followers(""), k.accounts, k.backlogs, f"{k.prefix}:acct:", k.live,
                                f"{k.ratelimit}:pace"],
                          args=[limit, repr(self.stall_timeout), repr(rate or self.rate), repr(ahead), repr(pacing)])
        items = [as_text(x) for x in flat]
        return [(rid, link, account) if account else (rid, link)
                for rid, link, account in zip(items[0::3], items[1::3], items[2::3])]

    def take_callbacks(self, limit: int, lease: float) -> list[PendingCallback]:
        """Up to ``limit`` callbacks due, each held ``lease`` seconds: sent again after that
        unless :meth:`callbacks_sent` confirms it first."""
        flat = self._take_callbacks(keys=[self.keys.callbacks, self.keys.record("")], args=[limit, repr(lease)])
        taken = []
        for request_id, lease_end, fields in zip(flat[0::3], flat[1::3], flat[2::3]):
            raw = {as_text(k): as_text(v) for k, v in zip(fields[0::2], fields[1::2])}
            request_id = as_text(request_id)
            # One id per ending: the Request-ID and the time it ended (its last update).
            task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"plural-cancel:callback:{request_id}:{raw['updated_at']}"))
            taken.append(PendingCallback(request_id, Callback(raw["callback"], raw.get("callback_queue", "")),
                                         format_record(request_id, raw), task_id, as_text(lease_end)))
        return taken

    def callbacks_sent(self, sent: Iterable[PendingCallback]) -> int:
        """Out of the pending index: callbacks sent (each only while it holds the lease it was
        taken with). Returns how many were removed."""
        args = [x for pending in sent for x in (pending.request_id, pending.lease)]
        return int(self._callbacks_sent(keys=[self.keys.callbacks], args=args)) if args else 0

    # -- dead letters and counts ------------------------------------------------------

    def failed(self, limit: int = 0) -> list[dict[str, Any]]:
        """Status records of dead letters (state ``failed``), latest first; ``limit`` 0: all."""
        ids = self.redis.zrevrange(self.keys.failed, 0, limit - 1 if limit > 0 else -1)
        # A record may have expired since it failed (FINISH prunes those from the set later).
        return [record for record in self.statuses([as_text(rid) for rid in ids]) if record]

    def requeue(self, request_ids: Iterable[str]) -> list[tuple[str, ...]]:
        """Dead letters back to ``queued`` (a fresh budget from their next claim, attempts kept).
        Returns (request_id, verdict, link), with the account after it for an account but the
        default one, verdict ``requeued`` (publish it),
        ``following`` (another cancel of its link is live: it ends with that one), ``missing``
        or ``not_failed``."""
        ids = list(request_ids)
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for rid in ids:
            self._requeue(keys=[k.record(rid), k.failed, k.due, k.stats, k.finished(""), k.link(""),
                                k.record(""), k.followers(""), self.queue, k.live],
                          args=[rid, STATS_BUCKET, repr(self.stall_timeout), repr(self.rate)], client=pipe)
        token = self.replicas.extend(pipe)
        replies = self.replicas.check(pipe.execute(), token)
        return [(rid, as_text(verdict), as_text(link), *((as_text(account),) if as_text(account) else ()))
                for rid, (verdict, link, account) in zip(ids, replies)]

    def stats(self) -> dict[str, Any]:
        """``{"active": {queued|running|retrying: n}, "outcomes": {outcome: n}, "deferred": n,
        "backlog": n, "dead_letters": n}`` from counters, never a scan. ``backlog``: bulk cancels
        waiting their turn in the ledger, every account's (counted among ``queued``; a few may have been taken
        meanwhile by a message sent by name). ``outcomes`` counts the records that
        finished within the last ``result_ttl`` seconds (those still readable) in hourly
        hashes: the oldest may count up to ``STATS_BUCKET`` seconds of just-expired ones."""
        now, pipe = self.clock(), self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.stats).zcard(self.keys.failed).llen(self.keys.backlog)
        pipe.smembers(self.keys.backlogs)
        for bucket in range(int((now - self.result_ttl) // STATS_BUCKET) * STATS_BUCKET, int(now) + 1, STATS_BUCKET):
            pipe.hgetall(self.keys.finished(bucket))
        active, dead, backlog, named, *hours = pipe.execute()
        others = [as_text(name) for name in named if as_text(name) != DEFAULT_ACCOUNT]
        if others:  # every account's backlog: the default one's, and those the backlogs set names
            pipe = self.redis.pipeline(transaction=False)
            for name in others:
                pipe.llen(self.keys.account_key(name, "backlog"))
            backlog += sum(pipe.execute())
        outcomes: Counter[str] = Counter()
        for hour in hours:
            outcomes.update({as_text(k): int(v) for k, v in hour.items()})
        # Counters dip below zero for records that predate them; never show that.
        return {"active": {state: max(0, int(active.get(state.encode(), 0))) for state in ACTIVE},
                "outcomes": {k: n for k, n in sorted(outcomes.items()) if n > 0},
                "deferred": max(0, int(active.get(b"deferred", 0))), "backlog": backlog, "dead_letters": dead}

    def seed_account_stats(self) -> bool:
        """Count the records live from before accounts as the default account's (``SEED_ACCOUNT_STATS``),
        once, before the first accounts are published; True when it did."""
        k = self.keys
        return bool(self._seed_account_stats(keys=[k.stats, k.account_key(DEFAULT_ACCOUNT, "stats"), k.accounts]))

    def forget_idle_account(self, account: str) -> bool:
        """Remove the counts of an account no worker knows when they are at nothing (``FORGET_IDLE_ACCOUNT``)."""
        return bool(self._forget_idle_account(keys=[self.keys.account_key(account, "stats")]))

    def account_stats(self, accounts: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each account's own counts: ``{name: {"active": {queued|running|retrying: n},
        "backlog": n}}``, from its counters (``Keys.account_key`` ``stats``) and its backlog's
        length, one round trip for all. Outcomes and dead letters are the fleet's
        (:meth:`stats`); a dead letter's record names its account (``failed --account``)."""
        names = list(accounts)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.account_key(name, "stats")).llen(self.keys.account_key(name, "backlog"))
        replies = pipe.execute()
        return {name: {"active": {state: max(0, int(counts.get(state.encode(), 0))) for state in ACTIVE},
                       "backlog": backlog}
                for name, counts, backlog in zip(names, replies[0::2], replies[1::2])}

    def oldest_live(self, accounts: Iterable[str]) -> dict[str, float | None]:
        """Each account's oldest live cancel (queued, running or retrying): ``{name: seconds
        since its record's created_at (Redis's clock), or None when it has none}``. One script
        call for all, which reads a few entries at each end of an account's live index
        (:attr:`Keys.live`) and backlog, never the whole: as cheap at a million live cancels
        as at one (``bench/scrape_cost.py``)."""
        names = list(accounts)
        if not names:
            return {}
        ages = self._oldest_live(keys=[self.keys.live, self.keys.backlog, self.keys.record("")], args=names)
        return {name: float(age) if as_text(age) else None for name, age in zip(names, ages)}

    def consumer_groups(self) -> dict[str, dict[str, Any]]:
        """Each consumer group of the outcome stream: ``{name: {"lag": entries not yet
        delivered to it (None: Redis cannot tell), "pending": delivered and not acknowledged,
        "oldest_unread_seconds": age of the first entry it has not read (None: none),
        "missed": True when entries it had not read were trimmed}}``. One ``XINFO GROUPS``
        and one ``XRANGE`` per group: cheap at any stream length."""
        try:
            groups = self.redis.xinfo_groups(self.keys.events)
        except redis.ResponseError:  # no stream yet (nothing has ended)
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            pipe.xrange(self.keys.events, min=f"({as_text(group['last-delivered-id'])}", count=1)
        pipe.xinfo_stream(self.keys.events)
        pipe.time()
        *firsts, stream, (seconds, micros) = pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        out = {}
        removed = stream["entries-added"] - stream["length"]
        oldest = _id(stream["first-entry"][0]) if stream.get("first-entry") else (0, 0)
        for group, first in zip(groups, firsts):
            unread = _id(first[0][0])[0] if first else None
            read = group.get("entries-read")
            out[as_text(group["name"])] = {
                "lag": group.get("lag"), "pending": group["pending"],
                "oldest_unread_seconds": None if unread is None else max(0.0, (now_ms - unread) / 1000),
                # It read fewer entries than were trimmed (or, when Redis has no count of what it
                # read, was given none of those left while some were trimmed): some went unread.
                "missed": removed > 0 and (read < removed if read is not None
                                           else _id(group["last-delivered-id"]) < oldest),
            }
        return out

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
            chunk = request_ids[start:start + READ_CHUNK]
            out += [format_record(rid, {as_text(k): as_text(v) for k, v in raw.items()}) if raw else None
                    for rid, raw in zip(chunk, pipe.execute())]
        return out


def parse_claim(reply: list) -> Claim:
    """The :class:`Claim` a claim script (``CLAIM_FN``) answered."""
    verdict = as_text(reply[0])
    if verdict == "claimed":
        return Claim("claimed", attempts=int(reply[1]), budget_left=float(reply[2]), throttles=int(reply[3]))
    if verdict == "gave_up":
        error, status = as_text(reply[2]), as_text(reply[3])
        return Claim("gave_up", attempts=int(reply[1]), last_error=json.loads(error) if error else None,
                     link_status=status or None, age=float(reply[4]))
    if verdict == "mismatch":
        return Claim(verdict, link=as_text(reply[1]))
    return Claim(verdict)


def format_record(request_id: str, raw: dict[str, str]) -> dict[str, Any]:
    """A record's hash fields (its key names ``request_id``) as the public status dictionary."""
    return {
        "request_id": request_id,
        "payment_link_id": raw.get("payment_link_id"),
        "account": raw.get("account") or DEFAULT_ACCOUNT,
        "state": raw.get("state"),
        "outcome": raw.get("outcome") or None,
        "link_status": raw.get("link_status") or None,
        "attempts": int(raw.get("attempts") or 0),
        "next_attempt_at": stored_time(raw.get("next_attempt_at")),
        "last_error": json.loads(raw["last_error"]) if raw.get("last_error") else None,
        "amount": json.loads(raw["amount"]) if raw.get("amount") else None,
        "created_at": stored_time(raw.get("created_at")),
        "updated_at": stored_time(raw.get("updated_at") or raw.get("created_at")),  # not updated since
        "cancelled_at": raw.get("cancelled_at") or None,
        "follows": raw.get("follows") or None,
    }


def stored_time(value: str | None) -> str | None:
    """A time stored as epoch seconds (text) as ISO 8601 UTC; None when absent or empty."""
    return format_timestamp(float(value)) if value else None


def _id(entry_id: Any) -> tuple[int, int]:
    """A stream entry id as (milliseconds of Redis's clock it was made at, sequence)."""
    ms, _, seq = as_text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def as_text(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
