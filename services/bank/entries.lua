-- Payloads of one image in rank order: {label, payload-or-false, ...}
local labels = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i, label in ipairs(labels) do
  out[#out + 1] = label
  out[#out + 1] = redis.call('GET', ARGV[1] .. label)
end
return out
