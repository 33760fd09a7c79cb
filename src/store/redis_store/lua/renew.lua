-- renew: extend the lease while its holder is current.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id
-- ARGV[2]  lease ttl, ms
-- returns  1 renewed, 0 the lease was lost
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'i' and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'l', int(now + tonumber(ARGV[2])))
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
