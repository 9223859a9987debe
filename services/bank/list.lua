-- A page of images: {image, -best score, count, ...}. KEYS: idx:best, idx:lex, idx:recent.
-- ARGV: key prefix, mode, offset, limit.
local p, mode, off, lim = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ids
if mode == 'score' then
  ids = redis.call('ZRANGE', KEYS[1], off, off + lim - 1)
elseif mode == 'id' then
  ids = redis.call('ZRANGEBYLEX', KEYS[2], '-', '+', 'LIMIT', off, lim)
else
  ids = redis.call('ZREVRANGE', KEYS[3], off, off + lim - 1)
end
local out = {}
for _, img in ipairs(ids) do
  local rank = rank_key(p, img)
  local best = redis.call('ZRANGE', rank, 0, 0, 'WITHSCORES')
  out[#out + 1] = img
  out[#out + 1] = best[2] or false
  out[#out + 1] = redis.call('ZCARD', rank)
end
return out
