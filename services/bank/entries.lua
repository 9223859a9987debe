-- Payloads of one image in rank order: {label, payload-or-false, ...}
-- KEYS[1] = the image's rank zset, ARGV[1] = key prefix, ARGV[2] = image id.
local labels = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i, label in ipairs(labels) do
  out[#out + 1] = label
  out[#out + 1] = redis.call('GET', entry_key(ARGV[1], ARGV[2], label))
end
return out
