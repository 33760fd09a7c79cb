-- begin for a record held as one string, 'i' .. lease id .. fence .. '|'
-- .. fingerprint .. lease end: the path a new key takes, for
-- benches/redis_record.sh to weigh against lua/begin.lua. A sketch, not a
-- store: it leaves out what begin.lua does for lapsed and unknown leases.
-- KEYS[1] the record; ARGV as begin.lua's 1 to 4.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local v = redis.call('GET', KEYS[1])
if v then
  local s = string.sub(v, 1, 1)
  if s == 'c' then return {'c', v, redis.call('PTTL', KEYS[1])} end
  return {'i', v}
end
local fence = string.format('%d', us)
redis.call('SET', KEYS[1], 'i' .. ARGV[1] .. fence .. '|' .. ARGV[2] .. string.format('%d', now + tonumber(ARGV[3])), 'PX', ARGV[4])
return {'a', fence}
