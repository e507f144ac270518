"""The ledger's Lua scripts, one per atomic change, each headed by its ``KEYS:`` / ``ARGV:``.

Kept apart from :mod:`worker.ledger` (which registers and calls them) so that each
module stays one readable size.

Every time in these scripts is Redis's own clock (``redis_now``): due times, leases,
holds and deadlines are decided by one clock, never by the clocks of the hosts that
run producers and workers. Callers pass durations (seconds from now), not instants.

The ``due`` index holds every live cancel, scored by when it next needs attention: when
its message should have been taken by (queued), when its lease runs out (running), when
it may try again (deferred), when to check that the cancel it follows is still there
(following). Nothing leaves the index but an ending, so a cancel whose message vanished
is always found again (``PUMP``), and so is one whose leader's record vanished.
The one exception waits before it: a bulk cancel held in the ``backlog`` list until the
pump has room for it (a list entry is a fraction of a message's or an index entry's
bytes); the pump moves it into the index as it publishes it.
"""

from plural_cancel.worker.lua import Lua, script
from plural_cancel.worker.pace import PACE_FN
from plural_cancel.worker.redis_clock import REDIS_NOW

# Needed by every script that moves a record: the stats hash (records per active state)
# and the backlog estimate.
_PRELUDE = Lua("""
local ACTIVE = {queued = true, running = true, retrying = true}
-- An account as records store it and scripts take it: '' (or no field) is the default one.
local function account_name(account)
  if account == nil or account == '' or account == false then return 'default' end
  return account
end
-- The fleet's counts and the account's own beside them (``Keys.account_key``: ``stats:<name>``).
local function count_move(stats, from, to, account)
  if from == to then return end
  local own = stats .. ':' .. account_name(account)
  if ACTIVE[from] then
    redis.call('HINCRBY', stats, from, -1)
    redis.call('HINCRBY', own, from, -1)
  end
  if ACTIVE[to] then
    redis.call('HINCRBY', stats, to, 1)
    redis.call('HINCRBY', own, to, 1)
  end
end
-- Of an account's ``queued`` ones, those that follow another cancel of their link (and are
-- never sent): the pump leaves them out of what its room counts.
local function count_following(stats, account, by)
  redis.call('HINCRBY', stats .. ':' .. account_name(account), 'following', by)
end
-- ``Keys.link``: one live cancel per (account, link); the default account's keys as before accounts.
local function link_key(links, account, link_id)
  if account == nil or account == '' or account == false then return links .. link_id end
  return links .. account .. ':' .. link_id
end
-- What the schedule names a link of an account by (``worker.schedule``), and a Request-ID
-- taken by a scheduled cancel maps to: the link id, ``<account>:<link>`` for another account.
local function slot_of(account, link_id)
  if account == nil or account == '' or account == false then return link_id end
  return account .. ':' .. link_id
end
-- ``Keys.account_key``: an account's backlog beside the default one's.
local function backlog_key(backlog, account)
  if account == nil or account == '' or account == false then return backlog end
  return backlog .. ':' .. account
end
-- ``Keys.account_key`` ``live``: an account's live cancels outside its backlog, by created_at.
local live_key = backlog_key
-- When a message sent now should have been taken by: the stall timeout plus the time
-- the queue's backlog needs at the rate limit, so a long queue is not republished.
local function recheck_at(now, queue, stall, rate)
  return now + tonumber(stall) + redis.call('LLEN', queue) / tonumber(rate)
end
""", needs=(REDIS_NOW,))

# KEYS: [1] record  [2] link (the Request-ID of its live cancel, ``Keys.link``)  [3] due
#       [4] stats  [5] schedule ids  [6] the queue (list)  [7] record key prefix
#       [8] followers key prefix  [9] backlog (list; used only when ``hold``: the account's is
#       beside it)  [10] backlogs (set of accounts with a backlog; only when ``hold``)
#       [11] live (sorted set; the account's is beside it, ``Keys.live``)
# ARGV: [1] request_id  [2] payment_link_id  [3] stall timeout (seconds)  [4] rate (per second)
#       [5] callback task name ('' for none)  [6] callback queue  [7] account ('': default)
# ``hold``: a bulk cancel waits in its account's backlog, not the due index, until the pump
# has room for it (``PUMP``); it is then published like any other.
# Returns 1 created (publish its message, unless held), 2 created following the live cancel
# of its (account, link) (publish nothing), 0 the same cancel exists already, -1 the
# Request-ID belongs to another link or account (in the ledger or in the schedule).
CREATE_FN = Lua("""
-- ``now`` and ``uncounted`` are for CREATE_MANY: one clock reading per batch, and the
-- stats counted once for the batch (Lua calls into Redis are most of a create's cost).
local function create(K, A, hold, now, uncounted)
  local record, link, due, stats, schedule_ids, queue, records, followers, backlog, backlogs, live = unpack(K, 1, 11)
  local rid, link_id, stall, rate, callback, callback_queue, account = unpack(A, 1, 7)
  local existing = redis.call('HMGET', record, 'payment_link_id', 'account')
  if existing[1] then
    if existing[1] ~= link_id or account_name(existing[2]) ~= account_name(account) then return -1 end
    return 0
  end
  local scheduled = redis.call('HGET', schedule_ids, rid)
  if scheduled and scheduled ~= slot_of(account, link_id) then return -1 end
  now = now or redis_now()
  -- No EXPIRE: a live record never expires; RESULT_TTL starts when it ends. Only what a
  -- new record cannot do without: the Request-ID is in the key, attempts start at none,
  -- and it was last updated when created (``format_record``). A million of them waiting
  -- in a backlog is a million of these hashes.
  redis.call('HSET', record, 'payment_link_id', link_id, 'state', 'queued', 'created_at', fmt(now))
  if account ~= '' then redis.call('HSET', record, 'account', account) end
  if callback ~= '' then redis.call('HSET', record, 'callback', callback, 'callback_queue', callback_queue) end
  if not uncounted then count_move(stats, nil, 'queued', account) end
  -- Lead the link unless a live cancel leads it (one GET in the usual case: none).
  local leader = redis.call('SET', link, rid, 'NX', 'GET')
  if leader then
    if ACTIVE[redis.call('HGET', records .. leader, 'state') or ''] then
      -- One live cancel per link: this one ends with the leader's state and outcome. It
      -- is in the due index too, so that it leads should its leader's record go (PUMP).
      redis.call('HSET', record, 'follows', leader)
      redis.call('SADD', followers .. leader, rid)
      redis.call('ZADD', due, recheck_at(now, queue, stall, rate), rid)
      redis.call('ZADD', live_key(live, account), now, rid)
      count_following(stats, account, 1)
      return 2
    end
    redis.call('SET', link, rid)
  end
  if hold then
    if redis.call('LPUSH', backlog_key(backlog, account), rid) == 1 then
      redis.call('SADD', backlogs, account_name(account))
    end
  else
    redis.call('ZADD', due, recheck_at(now, queue, stall, rate), rid)
    -- Held ones are not indexed by age: a backlog is in creation order already (``OLDEST_LIVE``).
    redis.call('ZADD', live_key(live, account), now, rid)
  end
  return 1
end
""", needs=(_PRELUDE,))

# KEYS: [1] due  [2] stats  [3] schedule ids  [4] the queue (list)  [5] record key prefix
#       [6] followers key prefix  [7] link key prefix  [8] backlog (list)  [9] backlogs (set)
#       [10] live (sorted set)
# ARGV: [1] stall timeout (seconds)  [2] rate (per second)  [3] callback task name ('' for
#       none)  [4] callback queue  [5] hold (0/1)  [6] account ('': default), then [7..]
#       pairs: request_id, payment_link_id
# Creates many records in one call (CREATE_FN each): a producer's batch costs one round
# trip and one command per chunk, not one per link. Returns CREATE_FN's code per pair.
CREATE_MANY = script(CREATE_FN, """
local due, stats, schedule_ids, queue, records, followers, links, backlog, backlogs, live = unpack(KEYS, 1, 10)
local stall, rate, callback, callback_queue = unpack(ARGV, 1, 4)
local hold, account, now = ARGV[5] == '1', ARGV[6], redis_now()
local K = {'', '', due, stats, schedule_ids, queue, records, followers, backlog, backlogs, live}
local A = {'', '', stall, rate, callback, callback_queue, account}
local out, created = {}, 0
for i = 7, #ARGV, 2 do
  local rid, link_id = ARGV[i], ARGV[i + 1]
  K[1], K[2], A[1], A[2] = records .. rid, link_key(links, account, link_id), rid, link_id
  local code = create(K, A, hold, now, true)
  if code > 0 then created = created + 1 end
  out[#out + 1] = code
end
if created > 0 then
  redis.call('HINCRBY', stats, 'queued', created)
  redis.call('HINCRBY', stats .. ':' .. account_name(account), 'queued', created)
end
return out
""")

# KEYS: CREATE_FN's eleven (a message sent by name creates its record here; not held, so the
#       backlog and backlogs go unused)
# ARGV: [1-7] CREATE_FN's  [8] owner  [9] lease seconds  [10] the retry budget (seconds from
#       the first attempt: the retry policy's, ``worker.policy``)
# ``claim(K, A)`` returns {verdict, ...}: claimed/attempts/budget seconds left (the whole
# budget before the first attempt)/throttles among the attempts, terminal/state,
# following/leader, held/seconds the holder's lease still runs, early/seconds until its
# due time, mismatch/the link its Request-ID belongs to (in the ledger or the schedule;
# ``<account>:<link>`` for another account's: ``slot_of``).
# Every verdict but ``claimed`` drops the copy: the due index carries the cancel, so a
# duplicate message has nothing to do.
# ``start_budget(K, A)``, with the claim's KEYS and ARGV, starts the retry budget.
CLAIM_FN = Lua("""
local function claim(K, A)
  local record, link, due, stats, schedule_ids = unpack(K, 1, 5)
  local rid, account, owner, lease, budget = A[1], A[7], A[8], tonumber(A[9]), tonumber(A[10])
  if create(K, A, false) == -1 then
    local taken = redis.call('HMGET', record, 'payment_link_id', 'account')
    if taken[1] then return {'mismatch', slot_of(taken[2], taken[1])} end
    return {'mismatch', redis.call('HGET', schedule_ids, rid) or ''}
  end
  local r = redis.call('HMGET', record, 'state', 'follows', 'next_attempt_at', 'deadline', 'attempts', 'lease_until',
                       'throttles')
  local state = r[1]
  if state == 'succeeded' or state == 'failed' then return {'terminal', state} end
  if r[2] then return {'following', r[2]} end
  local now = redis_now()
  local lease_until = tonumber(r[6] or '')
  if state == 'running' and lease_until and lease_until > now then return {'held', fmt(lease_until - now)} end
  local next_at = tonumber(r[3] or '')
  if next_at and next_at > now + 1 then return {'early', fmt(next_at - now)} end
  -- The retry budget counts from the first attempt (``start_budget``, when a call is let
  -- through): waiting in line, or held by the breaker, is not failing.
  local deadline = tonumber(r[4] or '') or now + budget
  local lease_end = now + lease
  redis.call('HSET', record, 'state', 'running', 'owner', owner, 'lease_until', fmt(lease_end), 'updated_at',
             fmt(now), 'next_attempt_at', '')
  redis.call('PERSIST', record)
  redis.call('SET', link, rid, 'NX')
  redis.call('ZADD', due, lease_end, rid)
  count_move(stats, state, 'running', account)
  if next_at then redis.call('HINCRBY', stats, 'deferred', -1) end
  return {'claimed', r[5] or '0', fmt(deadline - now), r[7] or '0'}
end

-- A call of the claimed cancel is let through: its retry budget starts now if this is its
-- first attempt (the deadline is the ledger's field; the budget, CLAIM's ARGV[10], the policy's).
local function start_budget(K, A)
  local record, budget = K[1], tonumber(A[10])
  if not redis.call('HGET', record, 'deadline') then
    redis.call('HSET', record, 'deadline', fmt(redis_now() + budget))
  end
end
""", needs=(CREATE_FN,))

# KEYS: [1] record  [2] link  [3] due  [4] failed  [5] events  [6] stats
#       [7] finished-hash prefix (the hour's start is appended)  [8] this record's followers
#       [9] record key prefix  [10] callbacks (pending index)  [11] live (sorted set; the
#       account's is beside it)
# ARGV: [1] request_id  [2] owner  [3] ttl seconds  [4] attempted (0/1)  [5] stream retention seconds
#       [6] JSON object of fields to set (state, outcome, link_status, ...)  [7] bucket seconds
# ``finish`` returns the attempts made, or -1 when ``owner`` no longer holds the cancel (its
# lease ran out and another delivery took it): a stale delivery writes nothing; and, when it
# ended the record, the seconds from its ``created_at`` to now as a second value (text).
FINISH_FN = Lua("""
-- Ends one record: its fields, its expiry (RESULT_TTL from now), its counts, its event,
-- and its callback, if it has one, pending (sent by a worker's pump: worker.publisher).
local function close(K, A, key, rid, before, fields, now, event, account)
  local events, stats, finished, callbacks, live = K[5], K[6], K[7], K[10], K[11]
  local ttl, retention, bucket_seconds = tonumber(A[3]), tonumber(A[5]), tonumber(A[7])
  table.insert(event, 'at')
  table.insert(event, fmt(now))
  table.insert(event, 'account')
  table.insert(event, account_name(account))
  for k, v in pairs(fields) do
    redis.call('HSET', key, k, v)
    table.insert(event, k)
    table.insert(event, v)
  end
  redis.call('HSET', key, 'updated_at', fmt(now), 'next_attempt_at', '')
  redis.call('HDEL', key, 'owner', 'lease_until')
  redis.call('EXPIRE', key, ttl)
  redis.call('ZREM', live_key(live, account), rid)
  count_move(stats, before, fields['state'], account)
  -- Counted in the hour it finished; the hash expires with the last record it counts.
  local bucket = math.floor(now / bucket_seconds) * bucket_seconds
  redis.call('HINCRBY', finished .. bucket, fields['outcome'], 1)
  redis.call('EXPIREAT', finished .. bucket, bucket + bucket_seconds + ttl)
  -- Kept by age, never by count: an entry goes once it is older than the retention (Redis
  -- trims whole nodes of ~100 entries, so a few may stay a little longer), and a flood of
  -- endings, however large, never pushes out one a consumer has not read yet.
  local minid = math.floor((now - retention) * 1000)
  redis.call('XADD', events, 'MINID', '~', math.max(0, minid), '*', unpack(event))
  if redis.call('HEXISTS', key, 'callback') == 1 then redis.call('ZADD', callbacks, fmt(now), rid) end
end

local function finish(K, A)
  local record, link, due, failed, followers, records = K[1], K[2], K[3], K[4], K[8], K[9]
  local rid, owner, ttl, attempted, fields = A[1], A[2], tonumber(A[3]), tonumber(A[4]), cjson.decode(A[6])
  local r = redis.call('HMGET', record, 'state', 'owner', 'payment_link_id', 'account', 'created_at')
  if r[1] ~= 'running' or r[2] ~= owner then return -1 end
  local now = redis_now()
  local attempts = redis.call('HINCRBY', record, 'attempts', attempted)
  close(K, A, record, rid, r[1], fields, now,
        {'request_id', rid, 'payment_link_id', r[3], 'attempts', tostring(attempts)}, r[4])
  redis.call('ZREM', due, rid)
  if fields['state'] == 'failed' then
    redis.call('ZADD', failed, now, rid)
  else
    redis.call('ZREM', failed, rid)
  end
  -- Dead letters whose records have expired: nothing left to list or retry.
  redis.call('ZREMRANGEBYSCORE', failed, '-inf', '(' .. (now - ttl))
  if redis.call('GET', link) == rid then redis.call('DEL', link) end
  -- The cancels that followed this one end with it, each announced under its own id.
  local shared = {state = fields['state'], outcome = fields['outcome'], link_status = fields['link_status'],
                  cancelled_at = fields['cancelled_at'], last_error = fields['last_error']}
  for _, f in ipairs(redis.call('SMEMBERS', followers)) do
    local key = records .. f
    local fr = redis.call('HMGET', key, 'state', 'payment_link_id', 'follows')
    if fr[3] == rid and ACTIVE[fr[1] or ''] then
      close(K, A, key, f, fr[1], shared, now, {'request_id', f, 'payment_link_id', fr[2], 'follows', rid}, r[4])
      count_following(K[6], r[4], -1)
      redis.call('ZREM', due, f)
    end
  end
  redis.call('DEL', followers)
  return attempts, fmt(now - (tonumber(r[5] or '') or now))
end
""", needs=(_PRELUDE,))

# KEYS, ARGV: FINISH_FN's (``Ledger.finish_call``'s, for ``gave_up``)
# ``give_up(K, A)``: a claimed cancel whose retry budget is spent ends ``gave_up`` (the
# budget is the retry policy's; ``worker.attempts`` calls this at admission, in the same
# round trip as the claim). Returns {'gave_up', attempts, last error JSON or '', the
# link's last known status or '', seconds from its created_at to its end}.
GIVE_UP_FN = Lua("""
local function give_up(K, A)
  local record = K[1]
  local r = redis.call('HMGET', record, 'last_error', 'link_status')
  local attempts, age = finish(K, A)
  return {'gave_up', attempts, r[1] or '', r[2] or '', age}
end
""", needs=(FINISH_FN,))

# KEYS: FINISH_FN's eleven (the link, due and followers are not used), then [12] schedule ids
# ARGV: FINISH_FN's seven (owner unused, attempted 0, fields state=failed, outcome=rejected,
#       last_error), then [8] the payment link id ('' when the message had no valid one)
#       [9] the account ('': default, or the message had no valid one)
# A message too malformed to run that still carries a usable Request-ID: its record is
# written ended, unless that Request-ID is taken, by a record or by a scheduled cancel
# (then nothing is written and the caller counts the message as malformed: a message
# never takes the Request-ID of a cancel that is to fire later). Returns 1 written, 0 not.
REJECT = script(FINISH_FN, """
local record, schedule_ids = KEYS[1], KEYS[12]
local rid, fields, link_id, account = ARGV[1], cjson.decode(ARGV[6]), ARGV[8], ARGV[9]
if redis.call('EXISTS', record) == 1 or redis.call('HEXISTS', schedule_ids, rid) == 1 then return 0 end
local now = redis_now()
redis.call('HSET', record, 'payment_link_id', link_id, 'created_at', fmt(now))
if account ~= '' then redis.call('HSET', record, 'account', account) end
close(KEYS, ARGV, record, rid, nil, fields, now, {'request_id', rid, 'payment_link_id', link_id, 'attempts', '0'},
      account)
return 1
""")

# KEYS: [1] record  [2] due  [3] stats
# ARGV: [1] request_id  [2] owner  [3] delay (seconds from now)  [4] attempted (0/1)
#       [5] last_error JSON or ''  [6] throttled (0/1: Plural throttled the attempt)
# Returns the attempts made, or -1 for a stale delivery (as FINISH_FN).
DEFER_FN = Lua("""
local function defer(K, A)
  local record, due, stats = K[1], K[2], K[3]
  local rid, owner, delay, attempted, last_error, throttled = A[1], A[2], tonumber(A[3]), tonumber(A[4]), A[5], A[6]
  local r = redis.call('HMGET', record, 'state', 'owner', 'account')
  if r[1] ~= 'running' or r[2] ~= owner then return -1 end
  local now = redis_now()
  local at = now + delay
  local attempts = redis.call('HINCRBY', record, 'attempts', attempted)
  if throttled == '1' then redis.call('HINCRBY', record, 'throttles', 1) end
  -- Held back before any call (rate limit, open breaker): still queued, with a time.
  local state = 'queued'
  if attempts > 0 then state = 'retrying' end
  redis.call('HSET', record, 'state', state, 'updated_at', fmt(now), 'next_attempt_at', fmt(at))
  redis.call('HDEL', record, 'owner', 'lease_until')
  if last_error ~= '' then redis.call('HSET', record, 'last_error', last_error) end
  count_move(stats, r[1], state, r[3])
  redis.call('HINCRBY', stats, 'deferred', 1)
  redis.call('ZADD', due, at, rid)
  return attempts
end
""", needs=(_PRELUDE,))

# KEYS: [1] due  [2] record key prefix  [3] the queue (list)  [4] backlog (list: the default
#       account's; another's is beside it)  [5] stats  [6] breaker (hash: the default
#       account's)  [7] link key prefix  [8] followers key prefix  [9] accounts (hash: name ->
#       rate limit)  [10] backlogs (set)  [11] account key prefix (``acct:``: another
#       account's breaker is ``acct:<name>:breaker``, its pace ``acct:<name>:ratelimit:pace``)
#       [12] live (sorted set; the account's is beside it)  [13] the default account's pace
#       (hash, ``worker.pace``)
# ARGV: [1] how many due ones at most  [2] stall timeout (seconds)  [3] the rate (per second)
#       of an account the workers have not published (the default one before any is)
#       [4] seconds of work to keep ahead of the workers (0: take nothing from the backlogs)
#       [5] share of an account's rate limit granted (``PACING``)
# Takes the live cancels whose time has come (a retry due, a message never taken, a
# lease run out) and returns {request_id, payment_link_id, account, ...} to publish. Each
# stays in the index, due again at ``recheck_at``: a publish that fails, or a message that
# vanishes later, is found again then. Ended and expired ones leave it. A follower is
# checked for its leader: while that is live it waits on; once its record has gone
# (deleted by hand, a pattern delete) or ended without ending it (its followers set
# gone), the follower leads its link and is sent under its own Request-ID, because the
# link still needs cancelling; or it follows the link's new live cancel, if it has one.
# Then each account's turn at its own backlog (oldest first), the default account's always
# (its backlog may predate the backlogs set), unless its breaker is open and not yet due
# to reopen: up to its own room, ARGV[4] seconds at its pace (its published rate limit, as
# its throttling leaves it: ``worker.pace``) less the cancels of its own that will run in
# that time anyway (queued and published, not following another; running), and at least
# one when none of its own is, however low its rate. Accounts do not share a room,
# so one account's backlog, however long, never takes another's turn. Each cancel taken
# enters the due index as a published one does; each live one taken off a backlog (a few
# were claimed meanwhile) enters its account's live index.
PUMP = script(_PRELUDE, PACE_FN, """
local index, records, queue, backlog, stats, breaker, links, followers, accounts, backlogs, acct = unpack(KEYS, 1, 11)
local live, default_pace = KEYS[12], KEYS[13]
local limit, stall, rate, ahead, pacing = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                          tonumber(ARGV[4]), tonumber(ARGV[5])
-- Whether a follower whose leader is gone leads now (true), or follows the link's live cancel.
local function lead(rid, link, gone, account)
  redis.call('HDEL', records .. rid, 'follows')
  local key = link_key(links, account, link)
  local leader = redis.call('GET', key)
  if leader and leader ~= rid and leader ~= gone and ACTIVE[redis.call('HGET', records .. leader, 'state') or ''] then
    redis.call('HSET', records .. rid, 'follows', leader)
    redis.call('SADD', followers .. leader, rid)
    return false
  end
  redis.call('SET', key, rid)
  count_following(stats, account, -1)
  return true
end

local now = redis_now()
local due = {}
if limit > 0 then due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit) end
local recheck = recheck_at(now, queue, stall, rate)
local out = {}
for _, rid in ipairs(due) do
  local r = redis.call('HMGET', records .. rid, 'state', 'payment_link_id', 'follows', 'account')
  if not ACTIVE[r[1] or ''] then
    redis.call('ZREM', index, rid)
  else
    redis.call('ZADD', index, recheck, rid)
    local send = not r[3]
    if r[3] then
      if ACTIVE[redis.call('HGET', records .. r[3], 'state') or ''] then
        redis.call('SADD', followers .. r[3], rid)  -- in case its followers set went: ended with it
      else
        send = lead(rid, r[2], r[3], r[4])
      end
    end
    if send then
      table.insert(out, rid)
      table.insert(out, r[2])
      table.insert(out, r[4] or '')
    end
  end
end
if ahead <= 0 then return out end
local names = redis.call('SMEMBERS', backlogs)
if redis.call('SISMEMBER', backlogs, 'default') == 0 then table.insert(names, 'default') end
local function number(value) return math.max(0, tonumber(value or '0') or 0) end
for _, name in ipairs(names) do
  local account = name
  if name == 'default' then account = '' end
  local list = backlog_key(backlog, account)
  local held = redis.call('LLEN', list)
  local own_breaker, own_pace = breaker, default_pace
  if account ~= '' then own_breaker, own_pace = acct .. account .. ':breaker', acct .. account .. ':ratelimit:pace' end
  local gate = redis.call('HMGET', own_breaker, 'state', 'reopens_at')
  -- Open and not yet due to reopen: held back. Due to reopen, a probe decides (a delivery);
  -- an account no worker serves any more has no deliveries to probe for it, and its held
  -- cancels must still reach one to be refused.
  local holding = gate[1] == 'open' and now < (tonumber(gate[2] or '') or math.huge)
  if held == 0 then
    redis.call('SREM', backlogs, name)
  elseif not holding then
    local own_rate = rate
    local published = tonumber(redis.call('HGET', accounts, name) or '')
    if published then own_rate = published * pacing end
    own_rate = pace_rate(own_pace, own_rate, now)
    local counts = redis.call('HMGET', stats .. ':' .. name, 'queued', 'running', 'following')
    local busy = math.max(0, number(counts[1]) - held - number(counts[3])) + number(counts[2])
    local room = math.floor(own_rate * ahead - busy)
    if room < 1 and busy == 0 then room = 1 end
    local looked = 0
    -- Bounded, so a backlog of entries claimed meanwhile never holds Redis in one long call.
    while room > 0 and looked < room + 1000 do
      looked = looked + 1
      local rid = redis.call('RPOP', list)
      if not rid then break end
      local r = redis.call('HMGET', records .. rid, 'state', 'payment_link_id', 'follows', 'created_at')
      if ACTIVE[r[1] or ''] then redis.call('ZADD', live_key(live, account), r[4], rid) end
      -- Anything else was claimed meanwhile (a message sent by name), or ended: it is not ours.
      if r[1] == 'queued' and not r[3] and not redis.call('ZSCORE', index, rid) then
        redis.call('ZADD', index, recheck, rid)
        table.insert(out, rid)
        table.insert(out, r[2])
        table.insert(out, account)
        room = room - 1
      end
    end
  end
end
return out
""")

# KEYS: [1] record  [2] failed  [3] due  [4] stats  [5] finished-hash prefix  [6] link key prefix
#       [7] record key prefix  [8] followers key prefix  [9] the queue (list)  [10] live (sorted
#       set; the account's is beside it)
# ARGV: [1] request_id  [2] bucket seconds  [3] stall timeout (seconds)  [4] rate (per second)
# A dead letter back to queued, live again (no expiry), attempts kept; its budget starts
# afresh at its next claim. It leads its link again, or follows the link's live cancel
# when another has started meanwhile. Returns {verdict, link, account}: requeued (publish
# it), following (publish nothing), missing or not_failed.
REQUEUE = script(_PRELUDE, """
local record, failed, due, stats, hours, links, records, followers, queue, live = unpack(KEYS, 1, 10)
local rid, bucket_seconds, stall, rate = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local r = redis.call('HMGET', record, 'state', 'payment_link_id', 'outcome', 'updated_at', 'account', 'created_at')
redis.call('ZREM', failed, rid)
if r[1] ~= 'failed' then return {r[1] and 'not_failed' or 'missing', r[2] or '', r[5] or ''} end
-- Uncount it from the hour it failed in, while that hash lives.
local finished = hours .. (math.floor((tonumber(r[4]) or 0) / bucket_seconds) * bucket_seconds)
if r[3] and redis.call('HGET', finished, r[3]) then redis.call('HINCRBY', finished, r[3], -1) end
local now = redis_now()
redis.call('HSET', record, 'state', 'queued', 'updated_at', fmt(now), 'next_attempt_at', '')
redis.call('HDEL', record, 'outcome', 'owner', 'lease_until', 'deadline', 'follows')
redis.call('PERSIST', record)
count_move(stats, 'failed', 'queued', r[5])
-- Live again, and as old as its record: the promise it carries dates from its creation.
redis.call('ZADD', live_key(live, r[5]), r[6] or fmt(now), rid)
local link = link_key(links, r[5], r[2])
local leader = redis.call('GET', link)
-- Due in the index either way: a follower is checked for its leader there (PUMP).
redis.call('ZADD', due, recheck_at(now, queue, stall, rate), rid)
if leader and leader ~= rid and ACTIVE[redis.call('HGET', records .. leader, 'state') or ''] then
  redis.call('HSET', record, 'follows', leader)
  redis.call('SADD', followers .. leader, rid)
  count_following(stats, r[5], 1)
  return {'following', r[2], r[5] or ''}
end
redis.call('SET', link, rid)
return {'requeued', r[2], r[5] or ''}
""")

# KEYS: [1] callbacks (pending index)  [2] record key prefix
# ARGV: [1] how many at most  [2] lease (seconds)
# Takes the callbacks due by now: each stays in the index, due again when the lease
# ends (its new score), so one whose sender dies before confirming it is sent again.
# Returns {request_id, lease end, {record field, value, ...}, ...}. An entry whose record
# has expired, names no callback, or is live again (a dead letter retried: its next end
# adds it anew) has nothing to send: dropped.
TAKE_CALLBACKS = script(REDIS_NOW, """
local callbacks, records = KEYS[1], KEYS[2]
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis_now()
local lease_end = fmt(now + lease)
local due = redis.call('ZRANGEBYSCORE', callbacks, '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, rid in ipairs(due) do
  local key = records .. rid
  local r = redis.call('HMGET', key, 'state', 'callback')
  if r[2] and (r[1] == 'succeeded' or r[1] == 'failed') then
    redis.call('ZADD', callbacks, lease_end, rid)
    table.insert(out, rid)
    table.insert(out, lease_end)
    table.insert(out, redis.call('HGETALL', key))
  else
    redis.call('ZREM', callbacks, rid)
  end
end
return out
""")

# KEYS: [1] callbacks (pending index)
# ARGV: pairs of request_id, the lease end TAKE_CALLBACKS gave it
# Removes the callbacks sent, each only if its entry still carries that lease: one taken
# again since (its lease ran out) or added anew (a retried dead letter ended again) stays.
# Returns how many were removed.
CALLBACKS_SENT = """
local callbacks = KEYS[1]
local removed = 0
for i = 1, #ARGV, 2 do
  local rid, lease_end = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', callbacks, rid)
  if score and tonumber(score) == tonumber(lease_end) then
    removed = removed + redis.call('ZREM', callbacks, rid)
  end
end
return removed
"""

# KEYS: [1] live (sorted set: the default account's; another's is beside it)  [2] backlog
#       (list: the same)  [3] record key prefix
# ARGV: account names ('default' for the default one)
# The age of each account's oldest live cancel: returns {seconds or '' (none live), ...}, one
# per account, by Redis's clock. A live cancel is in its account's live index (by created_at)
# or held in its backlog, which is in creation order (pushed at the head, taken from the
# tail): so the oldest is the older of the index's first and the backlog's last. Cheap at
# any size: a few entries at each end are read, never the whole. An entry whose record is
# no longer live (deleted by hand) is skipped, and dropped from the index, at most
# ``STALE_LOOK`` of each per account and call; a backlog's are the pump's to drop.
OLDEST_LIVE = script(_PRELUDE, """
local live, backlog, records = KEYS[1], KEYS[2], KEYS[3]
local STALE_LOOK = 100
local now = redis_now()
local out = {}
for i, name in ipairs(ARGV) do
  local account = name
  if name == 'default' then account = '' end
  local oldest
  local index = live_key(live, account)
  for _ = 1, STALE_LOOK do
    local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    if ACTIVE[redis.call('HGET', records .. head[1], 'state') or ''] then
      oldest = tonumber(head[2])
      break
    end
    redis.call('ZREM', index, head[1])
  end
  local tail = redis.call('LRANGE', backlog_key(backlog, account), -STALE_LOOK, -1)
  for j = #tail, 1, -1 do
    local r = redis.call('HMGET', records .. tail[j], 'state', 'created_at')
    if ACTIVE[r[1] or ''] then
      local created = tonumber(r[2] or '')
      if created and (not oldest or created < oldest) then oldest = created end
      break
    end
  end
  out[i] = oldest and fmt(math.max(0, now - oldest)) or ''
end
return out
""")

# KEYS: [1] stats (the fleet's)  [2] the default account's stats (``stats:default``)
#       [3] accounts (the published hash)
# Before accounts, the fleet's counts were the default account's alone: the first worker of
# the version that counts per account (no account published yet, no default counts yet)
# copies them, so that the records live from before count as the default account's when
# they end (else its counts, and the pump's room, would be off by them). Returns 1 copied.
SEED_ACCOUNT_STATS = """
local stats, own, accounts = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', accounts) == 1 or redis.call('EXISTS', own) == 1 then return 0 end
local c = redis.call('HMGET', stats, 'queued', 'running', 'retrying')
redis.call('HSET', own, 'queued', c[1] or '0', 'running', c[2] or '0', 'retrying', c[3] or '0')
return 1
"""

# KEYS: [1] an account's stats (``stats:<name>``)
# An account no worker knows, whose refused cancels left its counts at nothing: its hash
# goes, so that names sent by anyone leave no key behind. Returns 1 removed.
FORGET_IDLE_ACCOUNT = """
local c = redis.call('HMGET', KEYS[1], 'queued', 'running', 'retrying', 'following')
for i = 1, 4 do
  if (tonumber(c[i] or '0') or 0) ~= 0 then return 0 end
end
return redis.call('DEL', KEYS[1])
"""
