-- The most entries one image holds (0 when empty). KEYS[1] = idx:lex, ARGV[1] = key prefix.
local most = 0
for _, img in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  most = math.max(most, redis.call('ZCARD', rank_key(ARGV[1], img)))
end
return most
