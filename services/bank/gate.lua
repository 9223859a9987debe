-- QualiTeacher memory-bank gate (Eq. 3) for ONE image, atomically.
--
-- bank(image) = top_k by (ensemble desc, label id asc) of bank(image) U candidates,
-- the rule of qualiteacher/method/gating.py::gate with its `seen` set: a label id that
-- was ever gated for this image (admitted, rejected or evicted) is ignored when it comes
-- again, so a replay after a crash can never bring an evicted label back.
--
-- Ordering: the rank zset stores score = -ensemble. Redis orders a zset by (score asc,
-- member asc by memcmp), so ascending rank order is (ensemble desc, label id asc),
-- which is gating.rank_key (label ids are ASCII: memcmp order == Python str order).
-- Scores travel as Python repr() strings and go straight into ZADD, never through a
-- Lua number, so Redis compares exactly the doubles Python compares.
--
-- KEYS[1] rank zset      KEYS[2] seen set       KEYS[3] idx:best   KEYS[4] idx:lex
-- KEYS[5] idx:recent     KEYS[6] counters hash  KEYS[7] events     KEYS[8] meta hash
-- ARGV[1] image id       ARGV[2] top_k          ARGV[3] key prefix ("P")
-- ARGV[4] events MAXLEN  ARGV[5] teacher version for the event    ARGV[6] n candidates
-- ARGV[7 + 3i], ARGV[8 + 3i], ARGV[9 + 3i]: label id, repr(-ensemble), BankEntry bytes
--
-- Returns {admitted, evicted, rejected, duplicates, kept} (lists of label ids; kept best
-- first). Entry keys are built from ARGV[3] with entry_key (keys.py), which is why
-- the script is for a single Redis, not a cluster.

local rank, seen, idx_best, idx_lex, idx_recent, counters, events, meta =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local image_id = ARGV[1]
local top_k = tonumber(ARGV[2])
local prefix = ARGV[3]
local maxlen = ARGV[4]
local teacher_version = ARGV[5]
local n = tonumber(ARGV[6])

if top_k == nil or top_k < 1 then
  return redis.error_reply("ERR qt-gate: top_k must be >= 1")
end
-- Every process must gate with the same top_k, or the bank would mean different things.
redis.call('HSETNX', meta, 'top_k', ARGV[2])
local stored_k = redis.call('HGET', meta, 'top_k')
if tonumber(stored_k) ~= top_k then
  return redis.error_reply("ERR qt-gate: top_k " .. ARGV[2] .. " differs from the bank's " .. stored_k)
end

local function hist_bin(neg_score_str)
  local b = math.floor(-tonumber(neg_score_str))
  if b < 0 then b = 0 end
  if b > 9 then b = 9 end
  return 'hist:' .. b
end

local old_n = redis.call('ZCARD', rank)
local is_new = {}
local new_order = {}
local new_score = {}
local duplicates = {}

for i = 0, n - 1 do
  local label = ARGV[7 + 3 * i]
  local neg = ARGV[8 + 3 * i]
  local payload = ARGV[9 + 3 * i]
  if redis.call('SADD', seen, label) == 0 then
    -- gated before (in the bank, evicted, rejected, or earlier in this call)
    duplicates[#duplicates + 1] = label
  else
    redis.call('ZADD', rank, neg, label)
    redis.call('SET', entry_key(prefix, image_id, label), payload)
    is_new[label] = true
    new_order[#new_order + 1] = label
    new_score[label] = neg
  end
end

-- Everything past top_k leaves: old members are evicted, new ones rejected.
local evicted, rejected = {}, {}
local over = redis.call('ZRANGE', rank, top_k, -1, 'WITHSCORES')
for j = 1, #over, 2 do
  local label = over[j]
  redis.call('DEL', entry_key(prefix, image_id, label))
  if is_new[label] then
    rejected[#rejected + 1] = label
    is_new[label] = false
  else
    evicted[#evicted + 1] = label
    redis.call('HINCRBY', counters, hist_bin(over[j + 1]), -1)
  end
end
if #over > 0 then
  redis.call('ZREMRANGEBYRANK', rank, top_k, -1)
end

local admitted = {}
for _, label in ipairs(new_order) do
  if is_new[label] then
    admitted[#admitted + 1] = label
    redis.call('HINCRBY', counters, hist_bin(new_score[label]), 1)
  end
end

local new_n = redis.call('ZCARD', rank)
redis.call('HINCRBY', counters, 'gate_calls', 1)
redis.call('HINCRBY', counters, 'candidates', n)
redis.call('HINCRBY', counters, 'admitted', #admitted)
redis.call('HINCRBY', counters, 'rejected', #rejected)
redis.call('HINCRBY', counters, 'evicted', #evicted)
redis.call('HINCRBY', counters, 'duplicates', #duplicates)
redis.call('HINCRBY', counters, 'entries', #admitted - #evicted)
if old_n == 0 and new_n > 0 then
  redis.call('HINCRBY', counters, 'images', 1)
end

if new_n > 0 then
  local best = redis.call('ZRANGE', rank, 0, 0, 'WITHSCORES')
  redis.call('ZADD', idx_best, best[2], image_id)
  redis.call('ZADD', idx_lex, 0, image_id)
  if #admitted > 0 then
    local seq = redis.call('HINCRBY', counters, 'seq', 1)
    redis.call('ZADD', idx_recent, seq, image_id)
  end
end

redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*',
  'image_id', image_id,
  'admitted', table.concat(admitted, ','),
  'evicted', table.concat(evicted, ','),
  'rejected', table.concat(rejected, ','),
  'duplicates', table.concat(duplicates, ','),
  'teacher_version', teacher_version)

local kept = redis.call('ZRANGE', rank, 0, -1)
return {admitted, evicted, rejected, duplicates, kept}
