"""Cancels scheduled for later: "cancel this link at T unless the order gets paid".

Kept in Redis, never in a process's memory, so a restart loses nothing:

- a sorted set of payment link ids scored by their due time (epoch seconds), one
  member per link, so scheduling a link again moves it instead of adding a second;
- a hash per link with the ``request_id`` the cancel will carry, its ``at`` and its
  callback, if any (``callback``, ``callback_queue``);
- a hash Request-ID -> link, so one Request-ID never names two links;
- after it fires, a short-lived marker per link (``request_id``, ``at``, ``fired_at``),
  kept ``fired_ttl`` seconds, so that an unschedule that comes too late can say so.

Firing (``tasks.periodic.fire_schedules``) has three steps: :meth:`Schedule.take_due`
marks due entries ``firing`` (held until a hold time, as the ledger does for its own
sets), the producer path creates their ledger records and publishes them, and
:meth:`Schedule.mark_fired` removes them. A firer that dies between the steps leaves
the entries to come due again at the hold time; their Request-IDs keep it one cancel.

Each change is one Lua script. An entry that is ``firing``, or whose Request-ID already
has a ledger record, is past stopping: unscheduling it reports ``fired``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from plural_cancel.errors import RequestIdConflict
from plural_cancel.worker.keys import Keys
from plural_cancel.worker.ledger import Callback, as_text, stored_time
from plural_cancel.worker.redis_clock import REDIS_NOW
from plural_cancel.worker.replication import ReplicaWait

# KEYS: [1] schedule  [2] this link's hash  [3] schedule ids  [4] ledger record key prefix
# ARGV: [1] payment_link_id  [2] request_id to use unless one is kept  [3] at
#       [4] 1 when the caller named the Request-ID (it replaces the kept one)
#       [5] callback task name ('' for none: a moved entry drops its old one)  [6] callback queue
# Returns {verdict, request_id}: scheduled (new), moved (the pending one, new time)
# or conflict (the Request-ID belongs to another link; the link is returned instead).
# Every "now" here and below is Redis's clock: a firer's hold and an unschedule are
# compared on one clock, whatever the hosts' clocks say.
SCHEDULE = REDIS_NOW + """
local link = ARGV[1]
local current = redis.call('HGET', KEYS[2], 'request_id')
local verdict = 'scheduled'
local rid = ARGV[2]
if current then
  local firing = tonumber(redis.call('HGET', KEYS[2], 'firing') or '') or 0
  local too_late = firing > redis_now() or redis.call('EXISTS', KEYS[4] .. current) == 1
  if not too_late then
    verdict = 'moved'
    if ARGV[4] == '0' then rid = current end
  end
end
if rid ~= current then
  local other = redis.call('HGET', KEYS[3], rid)
  if other and other ~= link then return {'conflict', other} end
  local recorded = redis.call('HGET', KEYS[4] .. rid, 'payment_link_id')
  if recorded and recorded ~= link then return {'conflict', recorded} end
  if current and redis.call('HGET', KEYS[3], current) == link then redis.call('HDEL', KEYS[3], current) end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'request_id', rid, 'at', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'callback', ARGV[5], 'callback_queue', ARGV[6]) end
redis.call('HSET', KEYS[3], rid, link)
redis.call('ZADD', KEYS[1], ARGV[3], link)
return {verdict, rid}
"""

# KEYS: [1] schedule  [2] this link's hash  [3] schedule ids  [4] this link's fired marker
#       [5] ledger record key prefix
# ARGV: [1] payment_link_id
# Returns {verdict, request_id}: removed (it will never fire), fired (being fired or
# already fired: too late) or none (nothing scheduled, nothing fired recently).
UNSCHEDULE = REDIS_NOW + """
local rid = redis.call('HGET', KEYS[2], 'request_id')
if rid then
  local firing = tonumber(redis.call('HGET', KEYS[2], 'firing') or '') or 0
  if firing > redis_now() or redis.call('EXISTS', KEYS[5] .. rid) == 1 then
    return {'fired', rid}
  end
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  if redis.call('HGET', KEYS[3], rid) == ARGV[1] then redis.call('HDEL', KEYS[3], rid) end
  return {'removed', rid}
end
local fired = redis.call('HGET', KEYS[4], 'request_id')
if fired then return {'fired', fired} end
return {'none', ''}
"""

# KEYS: [1] schedule  [2] link hash key prefix
# ARGV: [1] how many at most  [2] hold (seconds)
# Marks entries due by now firing for ARGV[2] seconds (the hold's end is also their new
# score) and returns {link, request_id, at, callback, callback queue, ...} (callback '' for
# none). A member without its hash has nothing
# to fire: dropped.
TAKE_DUE = REDIS_NOW + """
local now = redis_now()
local hold_until = fmt(now + tonumber(ARGV[2]))
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, link in ipairs(due) do
  local hash = KEYS[2] .. link
  local fields = redis.call('HMGET', hash, 'request_id', 'at', 'callback', 'callback_queue')
  if fields[1] then
    redis.call('ZADD', KEYS[1], hold_until, link)
    redis.call('HSET', hash, 'firing', hold_until)
    table.insert(out, link)
    table.insert(out, fields[1])
    table.insert(out, fields[2] or '')
    table.insert(out, fields[3] or '')
    table.insert(out, fields[4] or '')
  else
    redis.call('ZREM', KEYS[1], link)
  end
end
return out
"""

# KEYS: [1] schedule  [2] link hash key prefix  [3] schedule ids  [4] fired marker key prefix
# ARGV: [1] marker ttl seconds  [2..] quadruples: link, request_id, at, result
# An entry rescheduled meanwhile under another Request-ID is a new schedule: it stays.
MARK_FIRED = REDIS_NOW + """
local fired_at = fmt(redis_now())
for i = 2, #ARGV, 4 do
  local link, rid, at, result = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local hash = KEYS[2] .. link
  if redis.call('HGET', hash, 'request_id') == rid then
    redis.call('ZREM', KEYS[1], link)
    redis.call('DEL', hash)
  end
  if redis.call('HGET', KEYS[3], rid) == link then redis.call('HDEL', KEYS[3], rid) end
  local marker = KEYS[4] .. link
  redis.call('DEL', marker)
  redis.call('HSET', marker, 'request_id', rid, 'at', at, 'fired_at', fired_at, 'result', result)
  redis.call('EXPIRE', marker, ARGV[1])
end
return (#ARGV - 1) / 4
"""


@dataclass(frozen=True)
class Due:
    """One scheduled cancel taken for firing."""

    payment_link_id: str
    request_id: str
    at: float
    """Epoch seconds it was due."""
    callback: Callback | None = None


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
        self._take_due = client.register_script(TAKE_DUE)
        self._mark_fired = client.register_script(MARK_FIRED)

    def put(self, payment_link_id: str, at: float, request_id: str, *, replace: bool,
            callback: Callback | None = None) -> tuple[str, str]:
        """Schedule (or move) the cancel of a link to ``at`` (epoch seconds), with ``callback``.

        ``request_id`` is used for a new entry; a pending one keeps its own unless
        ``replace``, and takes ``callback`` (None drops the one it had). Returns (``scheduled`` or
        ``moved``, the Request-ID it will carry).
        Raises :class:`RequestIdConflict` when that Request-ID belongs to another link.
        """
        keys = [self.keys.schedule, self.keys.scheduled(payment_link_id), self.keys.schedule_ids,
                self.keys.record("")]
        verdict, value = (as_text(x) for x in self._replicated(self._schedule, keys, [
            payment_link_id, request_id, repr(at), int(replace), callback.task if callback else "",
            callback.queue if callback else ""]))
        if verdict == "conflict":
            raise RequestIdConflict(
                f"request_id: {request_id!r} is already used for a cancel of another payment link")
        return verdict, value

    def remove(self, payment_link_id: str) -> tuple[str, str | None]:
        """Unschedule a link's cancel. Returns (verdict, Request-ID or None).

        ``removed``: it will never fire. ``fired``: too late, it is being fired or has
        fired (within ``fired_ttl``). ``none``: nothing scheduled and nothing fired lately.
        """
        keys = [self.keys.schedule, self.keys.scheduled(payment_link_id), self.keys.schedule_ids,
                self.keys.schedule_fired(payment_link_id), self.keys.record("")]
        verdict, rid = (as_text(x) for x in self._replicated(self._unschedule, keys, [payment_link_id]))
        return verdict, rid or None

    def _replicated(self, script, keys: list[str], args: list[Any]) -> Any:
        """``script``'s reply, once the replicas ``REDIS_WAIT_REPLICAS`` asks for hold its writes."""
        pipe = self.redis.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        token = self.replicas.extend(pipe)
        [reply] = self.replicas.check(pipe.execute(), token)
        return reply

    def get(self, payment_link_id: str) -> dict[str, Any] | None:
        """What is known of a link's scheduled cancel, or None.

        ``{"payment_link_id", "state": "scheduled" | "firing" | "fired", "request_id",
        "at", "fired_at", "result"}``, times as ISO 8601 (UTC); ``result`` (see
        :meth:`mark_fired`) is None until it fires.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.scheduled(payment_link_id))
        pipe.hgetall(self.keys.schedule_fired(payment_link_id))
        pipe.time()
        *hashes, (seconds, micros) = pipe.execute()
        pending, fired = ({as_text(k): as_text(v) for k, v in raw.items()} for raw in hashes)
        if pending.get("request_id"):
            firing = float(pending.get("firing") or 0) > seconds + micros / 1e6  # Redis's clock, as the firer's
            return {"payment_link_id": payment_link_id, "state": "firing" if firing else "scheduled",
                    "request_id": pending["request_id"], "at": stored_time(pending.get("at")), "fired_at": None,
                    "result": None}
        if fired.get("request_id"):
            return {"payment_link_id": payment_link_id, "state": "fired", "request_id": fired["request_id"],
                    "at": stored_time(fired.get("at")), "fired_at": stored_time(fired.get("fired_at")),
                    "result": fired.get("result")}
        return None

    def take_due(self, *, limit: int, hold: float) -> list[Due]:
        """Mark up to ``limit`` entries due by now (Redis's clock) as firing for ``hold`` seconds."""
        flat = [as_text(x) for x in self._take_due(keys=[self.keys.schedule, self.keys.scheduled("")],
                                                 args=[limit, repr(hold)])]
        return [Due(link, rid, float(at or 0), Callback(task, queue) if task else None)
                for link, rid, at, task, queue in zip(*(flat[i::5] for i in range(5)))]

    def mark_fired(self, fired: list[tuple[Due, str]]) -> None:
        """Remove fired entries and leave their markers; each with its result.

        Results: ``enqueued``, ``following`` (its link had a live cancel: it ends with that
        one), ``already_enqueued`` (its Request-ID already had a ledger
        record, from an earlier firing or enqueue: still one cancel), ``conflict`` (the
        Request-ID had meanwhile been used for another link: not fired).
        """
        if not fired:
            return
        args: list[Any] = [self.fired_ttl]
        for due, result in fired:
            args += [due.payment_link_id, due.request_id, repr(due.at), result]
        self._mark_fired(keys=[self.keys.schedule, self.keys.scheduled(""), self.keys.schedule_ids,
                               self.keys.schedule_fired("")], args=args)
