-- dedup_extend: move the current lease's end to now + lease.
-- KEYS[1]  the dedup record hash
-- ARGV[1]  lease id
-- ARGV[2]  lease, ms
-- returns  the lease in ms, or -1 if the lease was lost
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lu', int(now + tonumber(ARGV[2])))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return tonumber(ARGV[2])
