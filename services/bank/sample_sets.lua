-- Uniform over images; each pick returns all of that image's entries, best first (one
-- atomic read per image, so a set never mixes two states of the bank).
-- ARGV[1] = key prefix, ARGV[2..] = uniforms in [0, 1). KEYS[1] = idx:lex.
local n_img = redis.call('ZCARD', KEYS[1])
local out = {}
if n_img == 0 then return out end
local p = ARGV[1]
for i = 2, #ARGV do
  local a = math.floor(tonumber(ARGV[i]) * n_img)
  if a >= n_img then a = n_img - 1 end
  local img = redis.call('ZRANGE', KEYS[1], a, a)[1]
  local set = {}
  for _, label in ipairs(redis.call('ZRANGE', rank_key(p, img), 0, -1)) do
    local payload = redis.call('GET', entry_key(p, img, label))
    if payload then set[#set + 1] = payload end
  end
  if #set > 0 then out[#out + 1] = set end
end
return out
