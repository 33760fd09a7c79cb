-- renew: extend the lease while its holder is current.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id
-- ARGV[2]  lease ttl, ms
-- returns  1 renewed, 0 the lease was lost
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'i' and h[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
