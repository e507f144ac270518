"""The ledger's Lua scripts, one per atomic change, each headed by its ``KEYS:`` / ``ARGV:``.

Kept apart from :mod:`worker.ledger` (which registers and calls them) so that each
module stays one readable size.
"""

# Prepended to each script that changes a state: keeps the stats hash (records per active state).
_COUNT = """
local ACTIVE = {queued = true, running = true, retrying = true}
local function count_move(stats, from, to)
  if from ~= to and ACTIVE[from] then redis.call('HINCRBY', stats, from, -1) end
  if from ~= to and ACTIVE[to] then redis.call('HINCRBY', stats, to, 1) end
end
"""

# KEYS: [1] record  [2] outbox  [3] stats
# ARGV: [1] request_id  [2] payment_link_id  [3] now  [4] ttl seconds  [5] deadline
# Returns 1 when created, 0 when the same cancel exists, -1 when the Request-ID is
# already used for another link.
CREATE = _COUNT + """
local existing = redis.call('HGET', KEYS[1], 'payment_link_id')
if existing then
  if existing ~= ARGV[2] then return -1 end
  return 0
end
redis.call('HSET', KEYS[1], 'request_id', ARGV[1], 'payment_link_id', ARGV[2], 'state', 'queued',
           'attempts', 0, 'created_at', ARGV[3], 'updated_at', ARGV[3], 'deadline', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
count_move(KEYS[3], nil, 'queued')
return 1
"""

# KEYS: [1] record  [2] link lock  [3] leases  [4] deferred  [5] outbox  [6] stats
# ARGV: [1] request_id  [2] payment_link_id  [3] now  [4] lease seconds  [5] owner
#       [6] ttl seconds  [7] deadline for a record created here
# Returns {verdict, detail}: claimed/attempts/deadline, terminal/state, mismatch/link,
# early/next_attempt_at, busy/seconds the lock still holds.
# A function of (KEYS, ARGV) so that ``worker.attempts`` can run it in a larger script.
CLAIM_FN = _COUNT + """
local function claim(KEYS, ARGV)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  -- A message sent by name from another service: the record starts here.
  redis.call('HSET', KEYS[1], 'request_id', ARGV[1], 'payment_link_id', ARGV[2], 'state', 'queued',
             'attempts', 0, 'created_at', ARGV[3], 'updated_at', ARGV[3], 'deadline', ARGV[7])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  state = 'queued'
  count_move(KEYS[6], nil, 'queued')
elseif redis.call('HGET', KEYS[1], 'payment_link_id') ~= ARGV[2] then
  return {'mismatch', redis.call('HGET', KEYS[1], 'payment_link_id')}
end
if state == 'succeeded' or state == 'failed' then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'terminal', state}
end
local now = tonumber(ARGV[3])
local due = tonumber(redis.call('HGET', KEYS[1], 'next_attempt_at') or '') or 0
if due > now + 1 then
  -- A stray copy arrived before its time; the due-time set brings the real one back.
  redis.call('ZADD', KEYS[4], 'NX', due, ARGV[1])
  return {'early', tostring(due)}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[5] then
  return {'busy', tostring(redis.call('PTTL', KEYS[2]) / 1000)}
end
redis.call('SET', KEYS[2], ARGV[5], 'PX', math.floor(tonumber(ARGV[4]) * 1000))
redis.call('HSET', KEYS[1], 'state', 'running', 'updated_at', ARGV[3], 'owner', ARGV[5], 'next_attempt_at', '')
count_move(KEYS[6], state, 'running')
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return {'claimed', redis.call('HGET', KEYS[1], 'attempts'), redis.call('HGET', KEYS[1], 'deadline')}
end
"""
CLAIM = CLAIM_FN + "return claim(KEYS, ARGV)\n"

# KEYS: [1] record  [2] link lock  [3] leases  [4] failed  [5] events  [6] stats
#       [7] finished-hash prefix (the hour's start is appended)
# ARGV: [1] request_id  [2] owner  [3] now  [4] ttl  [5] attempted (0/1)  [6] stream maxlen
#       [7] JSON object of fields to set (state, outcome, link_status, ...)  [8] bucket seconds
# Returns the attempts made. A function of (KEYS, ARGV), like CLAIM_FN.
FINISH_FN = _COUNT + """
local function finish(KEYS, ARGV)
  local fields = cjson.decode(ARGV[7])
  local before = redis.call('HGET', KEYS[1], 'state')
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'next_attempt_at', '')
  redis.call('HDEL', KEYS[1], 'owner')
  local event = {'request_id', ARGV[1], 'attempts', tostring(attempts), 'at', ARGV[3]}
  for k, v in pairs(fields) do
    redis.call('HSET', KEYS[1], k, v)
    table.insert(event, k)
    table.insert(event, v)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('ZREM', KEYS[3], ARGV[1])
  if fields['state'] == 'failed' then
    redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  else
    redis.call('ZREM', KEYS[4], ARGV[1])
  end
  -- Dead letters whose records have expired: nothing left to list or retry.
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (tonumber(ARGV[3]) - tonumber(ARGV[4])))
  count_move(KEYS[6], before, fields['state'])
  if before ~= 'succeeded' and before ~= 'failed' then
    -- Counted in the hour it finished; the hash expires with the last record it counts.
    local bucket = math.floor(tonumber(ARGV[3]) / tonumber(ARGV[8])) * tonumber(ARGV[8])
    redis.call('HINCRBY', KEYS[7] .. bucket, fields['outcome'], 1)
    redis.call('EXPIREAT', KEYS[7] .. bucket, bucket + tonumber(ARGV[8]) + tonumber(ARGV[4]))
  end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(event))
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
  return attempts
end
"""
FINISH = FINISH_FN + "return finish(KEYS, ARGV)\n"

# KEYS: [1] record  [2] link lock  [3] leases  [4] deferred  [5] stats
# ARGV: [1] request_id  [2] owner  [3] now  [4] due  [5] attempted (0/1)  [6] last_error JSON or ''
# Returns the attempts made. A function of (KEYS, ARGV), like CLAIM_FN.
DEFER_FN = _COUNT + """
local function defer(KEYS, ARGV)
  local before = redis.call('HGET', KEYS[1], 'state')
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[5]))
  -- Held back before any call (rate limit, open breaker): still queued, with a time.
  local state = 'queued'
  if attempts > 0 then state = 'retrying' end
  redis.call('HSET', KEYS[1], 'state', state, 'updated_at', ARGV[3], 'next_attempt_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'owner')
  count_move(KEYS[5], before, state)
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[6]) end
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
  return attempts
end
"""
DEFER = DEFER_FN + "return defer(KEYS, ARGV)\n"

# KEYS: [1] a sorted set (deferred, outbox or leases)  [2] record key prefix
# ARGV: [1] scores up to this are due  [2] how many at most  [3] hold until (new score)
# Marks due members as being handled (score pushed to ARGV[3]) and returns
# {request_id, payment_link_id, ...}. Members whose record has expired are dropped.
TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, rid in ipairs(due) do
  local link = redis.call('HGET', KEYS[2] .. rid, 'payment_link_id')
  if link then
    redis.call('ZADD', KEYS[1], ARGV[3], rid)
    table.insert(out, rid)
    table.insert(out, link)
  else
    redis.call('ZREM', KEYS[1], rid)
  end
end
return out
"""

# KEYS: [1] sorted set   ARGV: [1] held score   [2..] request ids
# Removes members only while they still carry the hold score: a cancel that has been
# deferred again in the meantime keeps its new due time.
RELEASE_HELD = """
local n = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""


# KEYS: [1] record  [2] failed  [3] outbox  [4] stats  [5] finished-hash prefix
# ARGV: [1] request_id  [2] now  [3] new deadline  [4] ttl seconds  [5] bucket seconds
# A dead letter back to queued with a fresh budget, attempts kept, and into the outbox
# (the reconciler publishes it if the caller dies first). Returns {verdict, link}.
REQUEUE = _COUNT + """
local r = redis.call('HMGET', KEYS[1], 'state', 'payment_link_id', 'outcome', 'updated_at')
redis.call('ZREM', KEYS[2], ARGV[1])
if r[1] ~= 'failed' then return {r[1] and 'not_failed' or 'missing', r[2] or ''} end
-- Uncount it from the hour it failed in, while that hash lives.
local finished = KEYS[5] .. (math.floor((tonumber(r[4]) or 0) / tonumber(ARGV[5])) * tonumber(ARGV[5]))
if r[3] and redis.call('HGET', finished, r[3]) then redis.call('HINCRBY', finished, r[3], -1) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[2], 'deadline', ARGV[3], 'next_attempt_at', '')
redis.call('HDEL', KEYS[1], 'outcome', 'owner')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
count_move(KEYS[4], 'failed', 'queued')
return {'requeued', r[2]}
"""
