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

from plural_cancel.worker.redis_clock import REDIS_NOW

# Prepended to each script: the stats hash (records per active state) and the backlog estimate.
_PRELUDE = REDIS_NOW + """
local ACTIVE = {queued = true, running = true, retrying = true}
local function count_move(stats, from, to)
  if from ~= to and ACTIVE[from] then redis.call('HINCRBY', stats, from, -1) end
  if from ~= to and ACTIVE[to] then redis.call('HINCRBY', stats, to, 1) end
end
-- When a message sent now should have been taken by: the stall timeout plus the time
-- the queue's backlog needs at the rate limit, so a long queue is not republished.
local function recheck_at(now, queue, stall, rate)
  return now + tonumber(stall) + redis.call('LLEN', queue) / tonumber(rate)
end
"""

# KEYS: [1] record  [2] link (the Request-ID of its live cancel)  [3] due  [4] stats
#       [5] schedule ids  [6] the queue (list)  [7] record key prefix  [8] followers key prefix
#       [9] backlog (list; used only when ``hold``)
# ARGV: [1] request_id  [2] payment_link_id  [3] stall timeout (seconds)  [4] rate (per second)
#       [5] callback task name ('' for none)  [6] callback queue
# ``hold``: a bulk cancel waits in the backlog, not the due index, until the pump has room
# for it (``PUMP``); it is then published like any other.
# Returns 1 created (publish its message, unless held), 2 created following the link's live
# cancel (publish nothing), 0 the same cancel exists already, -1 the Request-ID belongs to
# another link (in the ledger or in the schedule).
CREATE_FN = _PRELUDE + """
-- ``now`` and ``uncounted`` are for CREATE_MANY: one clock reading per batch, and the
-- stats counted once for the batch (Lua calls into Redis are most of a create's cost).
local function create(K, A, hold, now, uncounted)
  local existing = redis.call('HGET', K[1], 'payment_link_id')
  if existing then
    if existing ~= A[2] then return -1 end
    return 0
  end
  local scheduled = redis.call('HGET', K[5], A[1])
  if scheduled and scheduled ~= A[2] then return -1 end
  now = now or redis_now()
  -- No EXPIRE: a live record never expires; RESULT_TTL starts when it ends. Only what a
  -- new record cannot do without: the Request-ID is in the key, attempts start at none,
  -- and it was last updated when created (``format_record``). A million of them waiting
  -- in a backlog is a million of these hashes.
  redis.call('HSET', K[1], 'payment_link_id', A[2], 'state', 'queued', 'created_at', fmt(now))
  if A[5] ~= '' then redis.call('HSET', K[1], 'callback', A[5], 'callback_queue', A[6]) end
  if not uncounted then count_move(K[4], nil, 'queued') end
  -- Lead the link unless a live cancel leads it (one GET in the usual case: none).
  local leader = redis.call('SET', K[2], A[1], 'NX', 'GET')
  if leader then
    if ACTIVE[redis.call('HGET', K[7] .. leader, 'state') or ''] then
      -- One live cancel per link: this one ends with the leader's state and outcome. It
      -- is in the due index too, so that it leads should its leader's record go (PUMP).
      redis.call('HSET', K[1], 'follows', leader)
      redis.call('SADD', K[8] .. leader, A[1])
      redis.call('ZADD', K[3], recheck_at(now, K[6], A[3], A[4]), A[1])
      return 2
    end
    redis.call('SET', K[2], A[1])
  end
  if hold then
    redis.call('LPUSH', K[9], A[1])
  else
    redis.call('ZADD', K[3], recheck_at(now, K[6], A[3], A[4]), A[1])
  end
  return 1
end
"""

# KEYS: [1] due  [2] stats  [3] schedule ids  [4] the queue (list)  [5] record key prefix
#       [6] followers key prefix  [7] link key prefix  [8] backlog (list)
# ARGV: [1] stall timeout (seconds)  [2] rate (per second)  [3] callback task name ('' for
#       none)  [4] callback queue  [5] hold (0/1), then [6..] pairs: request_id, payment_link_id
# Creates many records in one call (CREATE_FN each): a producer's batch costs one round
# trip and one command per chunk, not one per link. Returns CREATE_FN's code per pair.
CREATE_MANY = CREATE_FN + """
local hold, now = ARGV[5] == '1', redis_now()
local K = {'', '', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[8]}
local A = {'', '', ARGV[1], ARGV[2], ARGV[3], ARGV[4]}
local out, created = {}, 0
for i = 6, #ARGV, 2 do
  K[1], K[2], A[1], A[2] = KEYS[5] .. ARGV[i], KEYS[7] .. ARGV[i + 1], ARGV[i], ARGV[i + 1]
  local code = create(K, A, hold, now, true)
  if code > 0 then created = created + 1 end
  out[#out + 1] = code
end
if created > 0 then redis.call('HINCRBY', KEYS[2], 'queued', created) end
return out
"""

# KEYS: CREATE_FN's eight (a message sent by name creates its record here)
# ARGV: [1-6] CREATE_FN's  [7] owner  [8] lease seconds  [9] retry budget seconds
# Returns {verdict, ...}: claimed/attempts/budget seconds left (the whole budget before the
# first attempt)/throttles among the attempts, terminal/state,
# following/leader, held/seconds the holder's lease still runs, early/seconds until its
# due time, mismatch/the link its Request-ID belongs to (in the ledger or the schedule). Every verdict but ``claimed`` drops the copy:
# the due index carries the cancel, so a duplicate message has nothing to do.
CLAIM_FN = CREATE_FN + """
local function claim(K, A)
  if create(K, A, false) == -1 then
    return {'mismatch', redis.call('HGET', K[1], 'payment_link_id') or redis.call('HGET', K[5], A[1]) or ''}
  end
  local r = redis.call('HMGET', K[1], 'state', 'follows', 'next_attempt_at', 'deadline', 'attempts', 'lease_until',
                       'throttles')
  local state = r[1]
  if state == 'succeeded' or state == 'failed' then return {'terminal', state} end
  if r[2] then return {'following', r[2]} end
  local now = redis_now()
  local lease_until = tonumber(r[6] or '')
  if state == 'running' and lease_until and lease_until > now then return {'held', fmt(lease_until - now)} end
  local next_at = tonumber(r[3] or '')
  if next_at and next_at > now + 1 then return {'early', fmt(next_at - now)} end
  -- The retry budget counts from the first attempt (``worker.attempts`` sets the deadline
  -- when a call is let through): waiting in line, or held by the breaker, is not failing.
  local deadline = tonumber(r[4] or '') or now + tonumber(A[9])
  local lease_end = now + tonumber(A[8])
  redis.call('HSET', K[1], 'state', 'running', 'owner', A[7], 'lease_until', fmt(lease_end), 'updated_at', fmt(now),
             'next_attempt_at', '')
  redis.call('PERSIST', K[1])
  redis.call('SET', K[2], A[1], 'NX')
  redis.call('ZADD', K[3], lease_end, A[1])
  count_move(K[4], state, 'running')
  if next_at then redis.call('HINCRBY', K[4], 'deferred', -1) end
  return {'claimed', r[5] or '0', fmt(deadline - now), r[7] or '0'}
end
"""

# KEYS: [1] record  [2] link  [3] due  [4] failed  [5] events  [6] stats
#       [7] finished-hash prefix (the hour's start is appended)  [8] this record's followers
#       [9] record key prefix  [10] callbacks (pending index)
# ARGV: [1] request_id  [2] owner  [3] ttl seconds  [4] attempted (0/1)  [5] stream retention seconds
#       [6] JSON object of fields to set (state, outcome, link_status, ...)  [7] bucket seconds
# Returns the attempts made, or -1 when ``owner`` no longer holds the cancel (its lease
# ran out and another delivery took it): a stale delivery writes nothing.
FINISH_FN = _PRELUDE + """
-- Ends one record: its fields, its expiry (RESULT_TTL from now), its counts, its event,
-- and its callback, if it has one, pending (sent by a worker's pump: worker.publisher).
local function close(K, A, key, rid, before, fields, now, event)
  table.insert(event, 'at')
  table.insert(event, fmt(now))
  for k, v in pairs(fields) do
    redis.call('HSET', key, k, v)
    table.insert(event, k)
    table.insert(event, v)
  end
  redis.call('HSET', key, 'updated_at', fmt(now), 'next_attempt_at', '')
  redis.call('HDEL', key, 'owner', 'lease_until')
  redis.call('EXPIRE', key, A[3])
  count_move(K[6], before, fields['state'])
  -- Counted in the hour it finished; the hash expires with the last record it counts.
  local bucket = math.floor(now / tonumber(A[7])) * tonumber(A[7])
  redis.call('HINCRBY', K[7] .. bucket, fields['outcome'], 1)
  redis.call('EXPIREAT', K[7] .. bucket, bucket + tonumber(A[7]) + tonumber(A[3]))
  -- Kept by age, never by count: an entry goes once it is older than the retention (Redis
  -- trims whole nodes of ~100 entries, so a few may stay a little longer), and a flood of
  -- endings, however large, never pushes out one a consumer has not read yet.
  local minid = math.floor((now - tonumber(A[5])) * 1000)
  redis.call('XADD', K[5], 'MINID', '~', math.max(0, minid), '*', unpack(event))
  if redis.call('HEXISTS', key, 'callback') == 1 then redis.call('ZADD', K[10], fmt(now), rid) end
end

local function finish(K, A)
  local r = redis.call('HMGET', K[1], 'state', 'owner', 'payment_link_id')
  if r[1] ~= 'running' or r[2] ~= A[2] then return -1 end
  local fields = cjson.decode(A[6])
  local now = redis_now()
  local attempts = redis.call('HINCRBY', K[1], 'attempts', tonumber(A[4]))
  close(K, A, K[1], A[1], r[1], fields, now,
        {'request_id', A[1], 'payment_link_id', r[3], 'attempts', tostring(attempts)})
  redis.call('ZREM', K[3], A[1])
  if fields['state'] == 'failed' then
    redis.call('ZADD', K[4], now, A[1])
  else
    redis.call('ZREM', K[4], A[1])
  end
  -- Dead letters whose records have expired: nothing left to list or retry.
  redis.call('ZREMRANGEBYSCORE', K[4], '-inf', '(' .. (now - tonumber(A[3])))
  if redis.call('GET', K[2]) == A[1] then redis.call('DEL', K[2]) end
  -- The cancels that followed this one end with it, each announced under its own id.
  local shared = {state = fields['state'], outcome = fields['outcome'], link_status = fields['link_status'],
                  cancelled_at = fields['cancelled_at'], last_error = fields['last_error']}
  for _, f in ipairs(redis.call('SMEMBERS', K[8])) do
    local key = K[9] .. f
    local fr = redis.call('HMGET', key, 'state', 'payment_link_id', 'follows')
    if fr[3] == A[1] and ACTIVE[fr[1] or ''] then
      close(K, A, key, f, fr[1], shared, now, {'request_id', f, 'payment_link_id', fr[2], 'follows', A[1]})
      redis.call('ZREM', K[3], f)
    end
  end
  redis.call('DEL', K[8])
  return attempts
end
"""

# KEYS: FINISH_FN's ten (the link, due and followers are not used), then [11] schedule ids
# ARGV: FINISH_FN's seven (owner unused, attempted 0, fields state=failed, outcome=rejected,
#       last_error), then [8] the payment link id ('' when the message had no valid one)
# A message too malformed to run that still carries a usable Request-ID: its record is
# written ended, unless that Request-ID is taken, by a record or by a scheduled cancel
# (then nothing is written and the caller counts the message as malformed: a message
# never takes the Request-ID of a cancel that is to fire later). Returns 1 written, 0 not.
REJECT = FINISH_FN + """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[11], ARGV[1]) == 1 then return 0 end
local now = redis_now()
redis.call('HSET', KEYS[1], 'payment_link_id', ARGV[8], 'created_at', fmt(now))
close(KEYS, ARGV, KEYS[1], ARGV[1], nil, cjson.decode(ARGV[6]), now,
      {'request_id', ARGV[1], 'payment_link_id', ARGV[8], 'attempts', '0'})
return 1
"""

# KEYS: [1] record  [2] due  [3] stats
# ARGV: [1] request_id  [2] owner  [3] delay (seconds from now)  [4] attempted (0/1)
#       [5] last_error JSON or ''  [6] throttled (0/1: Plural throttled the attempt)
# Returns the attempts made, or -1 for a stale delivery (as FINISH_FN).
DEFER_FN = _PRELUDE + """
local function defer(K, A)
  local r = redis.call('HMGET', K[1], 'state', 'owner')
  if r[1] ~= 'running' or r[2] ~= A[2] then return -1 end
  local now = redis_now()
  local due = now + tonumber(A[3])
  local attempts = redis.call('HINCRBY', K[1], 'attempts', tonumber(A[4]))
  if A[6] == '1' then redis.call('HINCRBY', K[1], 'throttles', 1) end
  -- Held back before any call (rate limit, open breaker): still queued, with a time.
  local state = 'queued'
  if attempts > 0 then state = 'retrying' end
  redis.call('HSET', K[1], 'state', state, 'updated_at', fmt(now), 'next_attempt_at', fmt(due))
  redis.call('HDEL', K[1], 'owner', 'lease_until')
  if A[5] ~= '' then redis.call('HSET', K[1], 'last_error', A[5]) end
  count_move(K[3], r[1], state)
  redis.call('HINCRBY', K[3], 'deferred', 1)
  redis.call('ZADD', K[2], due, A[1])
  return attempts
end
"""

# KEYS: [1] due  [2] record key prefix  [3] the queue (list)  [4] backlog (list)  [5] stats
#       [6] breaker (hash)  [7] link key prefix  [8] followers key prefix
# ARGV: [1] how many due ones at most  [2] stall timeout (seconds)  [3] rate (per second)
#       [4] seconds of work to keep ahead of the workers (0: take nothing from the backlog)
# Takes the live cancels whose time has come (a retry due, a message never taken, a
# lease run out) and returns {request_id, payment_link_id, ...} to publish. Each stays
# in the index, due again at ``recheck_at``: a publish that fails, or a message that
# vanishes later, is found again then. Ended and expired ones leave it. A follower is
# checked for its leader: while that is live it waits on; once its record has gone
# (deleted by hand, a pattern delete) or ended without ending it (its followers set
# gone), the follower leads its link and is sent under its own Request-ID, because the
# link still needs cancelling; or it follows the link's new live cancel, if it has one.
# Then, unless the breaker is open, held cancels from the backlog (oldest first) up to
# the room: ARGV[4] seconds at the rate, less what will run in that time anyway (the
# queue, the cancels running, the due ones, those due by then). Each enters the due
# index as a published one does.
PUMP = _PRELUDE + """
-- Whether a follower whose leader is gone leads now (true), or follows the link's live cancel.
local function lead(rid, link, gone)
  redis.call('HDEL', KEYS[2] .. rid, 'follows')
  local key = KEYS[7] .. link
  local leader = redis.call('GET', key)
  if leader and leader ~= rid and leader ~= gone and ACTIVE[redis.call('HGET', KEYS[2] .. leader, 'state') or ''] then
    redis.call('HSET', KEYS[2] .. rid, 'follows', leader)
    redis.call('SADD', KEYS[8] .. leader, rid)
    return false
  end
  redis.call('SET', key, rid)
  return true
end

local now = redis_now()
local limit = tonumber(ARGV[1])
local due = {}
if limit > 0 then due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit) end
local ahead = tonumber(ARGV[4])
-- Counted before the due ones are taken: they are among those due by then.
local soon = redis.call('LLEN', KEYS[3]) + redis.call('ZCOUNT', KEYS[1], '-inf', now + ahead)
local recheck = recheck_at(now, KEYS[3], ARGV[2], ARGV[3])
local out = {}
for _, rid in ipairs(due) do
  local r = redis.call('HMGET', KEYS[2] .. rid, 'state', 'payment_link_id', 'follows')
  if not ACTIVE[r[1] or ''] then
    redis.call('ZREM', KEYS[1], rid)
  else
    redis.call('ZADD', KEYS[1], recheck, rid)
    local send = not r[3]
    if r[3] then
      if ACTIVE[redis.call('HGET', KEYS[2] .. r[3], 'state') or ''] then
        redis.call('SADD', KEYS[8] .. r[3], rid)  -- in case its followers set went: ended with it
      else
        send = lead(rid, r[2], r[3])
      end
    end
    if send then
      table.insert(out, rid)
      table.insert(out, r[2])
    end
  end
end
if ahead <= 0 or redis.call('HGET', KEYS[6], 'state') == 'open' then return out end
soon = soon + math.max(0, tonumber(redis.call('HGET', KEYS[5], 'running') or '0'))
local room = math.floor(tonumber(ARGV[3]) * ahead - soon)
local looked = 0
-- Bounded, so a backlog of entries claimed meanwhile never holds Redis in one long call.
while room > 0 and looked < room + 1000 do
  looked = looked + 1
  local rid = redis.call('RPOP', KEYS[4])
  if not rid then break end
  local r = redis.call('HMGET', KEYS[2] .. rid, 'state', 'payment_link_id', 'follows')
  -- Anything else was claimed meanwhile (a message sent by name), or ended: it is not ours.
  if r[1] == 'queued' and not r[3] and not redis.call('ZSCORE', KEYS[1], rid) then
    redis.call('ZADD', KEYS[1], recheck, rid)
    table.insert(out, rid)
    table.insert(out, r[2])
    room = room - 1
  end
end
return out
"""

# KEYS: [1] record  [2] failed  [3] due  [4] stats  [5] finished-hash prefix  [6] link key prefix
#       [7] record key prefix  [8] followers key prefix  [9] the queue (list)
# ARGV: [1] request_id  [2] bucket seconds  [3] stall timeout (seconds)  [4] rate (per second)
# A dead letter back to queued, live again (no expiry), attempts kept; its budget starts
# afresh at its next claim. It leads its link again, or follows the link's live cancel
# when another has started meanwhile. Returns {verdict, link}: requeued (publish it),
# following (publish nothing), missing or not_failed.
REQUEUE = _PRELUDE + """
local r = redis.call('HMGET', KEYS[1], 'state', 'payment_link_id', 'outcome', 'updated_at')
redis.call('ZREM', KEYS[2], ARGV[1])
if r[1] ~= 'failed' then return {r[1] and 'not_failed' or 'missing', r[2] or ''} end
-- Uncount it from the hour it failed in, while that hash lives.
local finished = KEYS[5] .. (math.floor((tonumber(r[4]) or 0) / tonumber(ARGV[2])) * tonumber(ARGV[2]))
if r[3] and redis.call('HGET', finished, r[3]) then redis.call('HINCRBY', finished, r[3], -1) end
local now = redis_now()
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', fmt(now), 'next_attempt_at', '')
redis.call('HDEL', KEYS[1], 'outcome', 'owner', 'lease_until', 'deadline', 'follows')
redis.call('PERSIST', KEYS[1])
count_move(KEYS[4], 'failed', 'queued')
local link = KEYS[6] .. r[2]
local leader = redis.call('GET', link)
-- Due in the index either way: a follower is checked for its leader there (PUMP).
redis.call('ZADD', KEYS[3], recheck_at(now, KEYS[9], ARGV[3], ARGV[4]), ARGV[1])
if leader and leader ~= ARGV[1] and ACTIVE[redis.call('HGET', KEYS[7] .. leader, 'state') or ''] then
  redis.call('HSET', KEYS[1], 'follows', leader)
  redis.call('SADD', KEYS[8] .. leader, ARGV[1])
  return {'following', r[2]}
end
redis.call('SET', link, ARGV[1])
return {'requeued', r[2]}
"""

# KEYS: [1] callbacks (pending index)  [2] record key prefix
# ARGV: [1] how many at most  [2] lease (seconds)
# Takes the callbacks due by now: each stays in the index, due again when the lease
# ends (its new score), so one whose sender dies before confirming it is sent again.
# Returns {request_id, lease end, {record field, value, ...}, ...}. An entry whose record
# has expired, names no callback, or is live again (a dead letter retried: its next end
# adds it anew) has nothing to send: dropped.
TAKE_CALLBACKS = REDIS_NOW + """
local now = redis_now()
local lease_end = fmt(now + tonumber(ARGV[2]))
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, rid in ipairs(due) do
  local key = KEYS[2] .. rid
  local r = redis.call('HMGET', key, 'state', 'callback')
  if r[2] and (r[1] == 'succeeded' or r[1] == 'failed') then
    redis.call('ZADD', KEYS[1], lease_end, rid)
    table.insert(out, rid)
    table.insert(out, lease_end)
    table.insert(out, redis.call('HGETALL', key))
  else
    redis.call('ZREM', KEYS[1], rid)
  end
end
return out
"""

# KEYS: [1] callbacks (pending index)
# ARGV: pairs of request_id, the lease end TAKE_CALLBACKS gave it
# Removes the callbacks sent, each only if its entry still carries that lease: one taken
# again since (its lease ran out) or added anew (a retried dead letter ended again) stays.
# Returns how many were removed.
CALLBACKS_SENT = """
local removed = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""
