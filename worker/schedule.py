"""Cancels scheduled for later: "cancel this link at T unless the order gets paid".

Kept in Redis, never in a process's memory, so a restart loses nothing:

- a sorted set of payment link ids scored by their due time (epoch seconds), one
  member per (account, link), so scheduling a link again moves it instead of adding a
  second: the link id for the default account, ``<account>:<link>`` for another (its
  *slot*, :func:`slot`; a link id has no ``:``);
- a hash per link with the ``request_id`` the cancel will carry, its ``at`` and its
  callback, if any (``callback``, ``callback_queue``);
- a hash Request-ID -> link, so one Request-ID never names two links;
- after it fires, a short-lived marker per link (``request_id``, ``at``, ``fired_at``),
  kept ``fired_ttl`` seconds, so that an unschedule that comes too late can say so.

Firing (``tasks.periodic.fire_schedules``) is one script (``FIRE``): the due entries
leave the schedule and their ledger records appear (the ledger's own ``create``, held in
its backlog for the workers' pump, as a bulk enqueue's are) in one atomic step. So an
unschedule comes either before it (``removed``: it will never be sent) or after it
(``fired``: it was, or will be); there is no moment in between for a firer to stall in.

Each change is one Lua script. An entry whose Request-ID already has a ledger record is
past stopping too: unscheduling it reports ``fired``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import redis

from plural_cancel.errors import RequestIdConflict
from plural_cancel.worker.keys import DEFAULT_ACCOUNT, Keys
from plural_cancel.worker.ledger import Callback, Created, Ledger, as_text, stored_time
from plural_cancel.worker.ledger_lua import CREATE_FN
from plural_cancel.worker.lua import script
from plural_cancel.worker.replication import ReplicaWait

# KEYS: [1] schedule  [2] this link's hash  [3] schedule ids  [4] ledger record key prefix
# ARGV: [1] the link's slot (``slot``)  [2] request_id to use unless one is kept  [3] at
#       [4] 1 when the caller named the Request-ID (it replaces the kept one)
#       [5] callback task name ('' for none: a moved entry drops its old one)  [6] callback queue
# Returns {verdict, request_id}: scheduled (new), moved (the pending one, new time)
# or conflict (the Request-ID belongs to another link or account; its slot is returned instead).
SCHEDULE = """
local schedule, entry, schedule_ids, records = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local link, rid, at, named, callback, callback_queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local current = redis.call('HGET', entry, 'request_id')
local verdict = 'scheduled'
if current then
  -- Its Request-ID carries a cancel already (enqueued by hand): that one is past stopping.
  if redis.call('EXISTS', records .. current) == 0 then
    verdict = 'moved'
    if named == '0' then rid = current end
  end
end
if rid ~= current then
  local other = redis.call('HGET', schedule_ids, rid)
  if other and other ~= link then return {'conflict', other} end
  local recorded = redis.call('HMGET', records .. rid, 'payment_link_id', 'account')
  if recorded[1] then
    local taken = recorded[1]
    if recorded[2] then taken = recorded[2] .. ':' .. recorded[1] end
    if taken ~= link then return {'conflict', taken} end
  end
  if current and redis.call('HGET', schedule_ids, current) == link then redis.call('HDEL', schedule_ids, current) end
end
redis.call('DEL', entry)
redis.call('HSET', entry, 'request_id', rid, 'at', at)
if callback ~= '' then redis.call('HSET', entry, 'callback', callback, 'callback_queue', callback_queue) end
redis.call('HSET', schedule_ids, rid, link)
redis.call('ZADD', schedule, at, link)
return {verdict, rid}
"""

# KEYS: [1] schedule  [2] this link's hash  [3] schedule ids  [4] this link's fired marker
#       [5] ledger record key prefix
# ARGV: [1] the link's slot (``slot``)
# Returns {verdict, request_id}: removed (it will never fire), fired (too late: it fired,
# or its Request-ID carries a cancel already) or none (nothing scheduled, nothing fired
# recently). Atomic with FIRE: an entry is either still here or has fired.
UNSCHEDULE = """
local schedule, entry, schedule_ids, fired_marker, records = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local link = ARGV[1]
local rid = redis.call('HGET', entry, 'request_id')
if rid then
  if redis.call('EXISTS', records .. rid) == 1 then return {'fired', rid} end
  redis.call('ZREM', schedule, link)
  redis.call('DEL', entry)
  if redis.call('HGET', schedule_ids, rid) == link then redis.call('HDEL', schedule_ids, rid) end
  return {'removed', rid}
end
local fired = redis.call('HGET', fired_marker, 'request_id')
if fired then return {'fired', fired} end
return {'none', ''}
"""

# KEYS: [1] schedule  [2] link hash key prefix  [3] fired marker key prefix, then the
#       ledger's batch keys (``Ledger.batch_keys``): [4] due  [5] stats  [6] schedule ids
#       [7] the queue  [8] record key prefix  [9] followers key prefix  [10] link key prefix
#       [11] backlog  [12] backlogs  [13] live
# ARGV: [1] how many at most  [2] marker ttl seconds  [3] stall timeout (seconds)
#       [4] rate (per second)  [5-8] the names of CREATE_FN's codes 1, 2, 0, -1 for the
#       fired marker (``Created.fired``)
# Fires up to ARGV[1] entries due by now: each leaves the schedule, its ledger record is
# created (the ledger's CREATE_FN, held in the backlog for the pump) and its fired marker
# written, all in this one call. Returns {link, request_id, CREATE_FN's code, account
# ('': default), ...}. A member without its hash is dropped.
FIRE = script(CREATE_FN, """
local schedule, entries, markers = KEYS[1], KEYS[2], KEYS[3]
local due, stats, schedule_ids, queue, records, followers, links, backlog, backlogs, live = unpack(KEYS, 4, 13)
local limit, marker_ttl, stall, rate = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local RESULTS = {[1] = ARGV[5], [2] = ARGV[6], [0] = ARGV[7], [-1] = ARGV[8]}
local now = redis_now()
local fired = redis.call('ZRANGEBYSCORE', schedule, '-inf', now, 'LIMIT', 0, limit)
-- CREATE_FN's keys and arguments; the record's and the link's keys, ids and callback per entry.
local K = {'', '', due, stats, schedule_ids, queue, records, followers, backlog, backlogs, live}
local A = {'', '', stall, rate, '', '', ''}
local out = {}
for _, slot in ipairs(fired) do
  local account, link = string.match(slot, '^([^:]*):(.*)$')
  if not account then account, link = '', slot end
  local hash = entries .. slot
  local f = redis.call('HMGET', hash, 'request_id', 'at', 'callback', 'callback_queue')
  redis.call('ZREM', schedule, slot)
  local rid = f[1]
  if rid then
    K[1], K[2] = records .. rid, link_key(links, account, link)
    A[1], A[2], A[5], A[6], A[7] = rid, link, f[3] or '', f[4] or '', account
    local code = create(K, A, true, now)
    redis.call('DEL', hash)
    if redis.call('HGET', schedule_ids, rid) == slot then redis.call('HDEL', schedule_ids, rid) end
    local marker = markers .. slot
    redis.call('DEL', marker)
    redis.call('HSET', marker, 'request_id', rid, 'at', f[2] or '', 'fired_at', fmt(now), 'result', RESULTS[code])
    redis.call('EXPIRE', marker, marker_ttl)
    table.insert(out, link)
    table.insert(out, rid)
    table.insert(out, code)
    table.insert(out, account)
  end
end
return out
""")


def slot(payment_link_id: str, account: str = DEFAULT_ACCOUNT) -> str:
    """What the schedule names one (account, link) by: the link id for the default account,
    ``<account>:<link>`` for another."""
    return payment_link_id if account == DEFAULT_ACCOUNT else f"{account}:{payment_link_id}"


class Fired(NamedTuple):
    """One scheduled cancel fired by :meth:`Schedule.fire`."""

    payment_link_id: str
    request_id: str
    created: Created
    """What creating its record came to."""
    account: str = DEFAULT_ACCOUNT

    @property
    def result(self) -> str:
        """``enqueued``, ``following``, ``already_enqueued`` or ``conflict`` (``Created.fired``)."""
        return self.created.fired


class Schedule:
    """Scheduled cancels in Redis: schedule, unschedule, look up, and take the due ones."""

    def __init__(self, client: redis.Redis, *, fired_ttl: int, keys: Keys = Keys(),
                 replicas: ReplicaWait | None = None):
        """``fired_ttl``: seconds the "it fired" marker of a link is kept (RESULT_TTL);
        ``replicas``: how :meth:`put` and :meth:`remove` wait for Redis's replicas."""
        self.redis = client
        self.keys = keys
        self.replicas = replicas or ReplicaWait(client, 0, keys=keys)
        self.fired_ttl = fired_ttl
        self._schedule = client.register_script(SCHEDULE)
        self._unschedule = client.register_script(UNSCHEDULE)
        self._fire = client.register_script(FIRE)

    def put(self, payment_link_id: str, at: float, request_id: str, *, replace: bool,
            callback: Callback | None = None, account: str = DEFAULT_ACCOUNT) -> tuple[str, str]:
        """Schedule (or move) the cancel of a link to ``at`` (epoch seconds), with ``callback``.

        ``request_id`` is used for a new entry; a pending one keeps its own unless
        ``replace``, and takes ``callback`` (None drops the one it had). Returns (``scheduled`` or
        ``moved``, the Request-ID it will carry).
        Raises :class:`RequestIdConflict` when that Request-ID belongs to another link or account.
        """
        member = slot(payment_link_id, account)
        keys = [self.keys.schedule, self.keys.scheduled(member), self.keys.schedule_ids, self.keys.record("")]
        verdict, value = (as_text(x) for x in self._replicated(self._schedule, keys, [
            member, request_id, repr(at), int(replace), callback.task if callback else "",
            callback.queue if callback else ""]))
        if verdict == "conflict":
            raise RequestIdConflict(
                f"request_id: {request_id!r} is already used for a cancel of another payment link or account")
        return verdict, value

    def remove(self, payment_link_id: str, account: str = DEFAULT_ACCOUNT) -> tuple[str, str | None]:
        """Unschedule a link's cancel. Returns (verdict, Request-ID or None).

        ``removed``: it will never fire. ``fired``: too late, it is being fired or has
        fired (within ``fired_ttl``). ``none``: nothing scheduled and nothing fired lately.
        """
        member = slot(payment_link_id, account)
        keys = [self.keys.schedule, self.keys.scheduled(member), self.keys.schedule_ids,
                self.keys.schedule_fired(member), self.keys.record("")]
        verdict, rid = (as_text(x) for x in self._replicated(self._unschedule, keys, [member]))
        return verdict, rid or None

    def _replicated(self, script, keys: list[str], args: list[Any]) -> Any:
        """``script``'s reply, once the replicas ``REDIS_WAIT_REPLICAS`` asks for hold its writes."""
        pipe = self.redis.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        token = self.replicas.extend(pipe)
        [reply] = self.replicas.check(pipe.execute(), token)
        return reply

    def get(self, payment_link_id: str, account: str = DEFAULT_ACCOUNT) -> dict[str, Any] | None:
        """What is known of a link's scheduled cancel, or None.

        ``{"payment_link_id", "state": "scheduled" | "fired", "request_id", "at", "fired_at",
        "result"}``, times as ISO 8601 (UTC); ``fired_at`` and ``result`` (see :class:`Fired`)
        are None until it fires.
        """
        member = slot(payment_link_id, account)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.scheduled(member))
        pipe.hgetall(self.keys.schedule_fired(member))
        pending, fired = ({as_text(k): as_text(v) for k, v in raw.items()} for raw in pipe.execute())
        if pending.get("request_id"):
            return {"payment_link_id": payment_link_id, "account": account, "state": "scheduled",
                    "request_id": pending["request_id"],
                    "at": stored_time(pending.get("at")), "fired_at": None, "result": None}
        if fired.get("request_id"):
            return {"payment_link_id": payment_link_id, "account": account, "state": "fired",
                    "request_id": fired["request_id"],
                    "at": stored_time(fired.get("at")), "fired_at": stored_time(fired.get("fired_at")),
                    "result": fired.get("result")}
        return None

    def fire(self, ledger: Ledger, *, limit: int) -> list[Fired]:
        """Fire up to ``limit`` entries due by now (Redis's clock) into ``ledger``, held in its
        backlog for the pump (``FIRE``); each leaves its fired marker for ``fired_ttl`` seconds."""
        flat = [as_text(x) for x in self._fire(
            keys=[self.keys.schedule, self.keys.scheduled(""), self.keys.schedule_fired(""), *ledger.batch_keys()],
            args=[limit, self.fired_ttl, repr(ledger.stall_timeout), repr(ledger.rate),
                  *(code.fired for code in (Created.CREATED, Created.FOLLOWING, Created.EXISTS, Created.CONFLICT))])]
        return [Fired(flat[i], flat[i + 1], Created(int(flat[i + 2])), flat[i + 3] or DEFAULT_ACCOUNT)
                for i in range(0, len(flat), 4)]
