-- dedup_mark: "seen it" for a key not seen before.
-- KEYS[1]  the dedup record hash
-- ARGV[1]  ttl, ms
-- ARGV[2]  the message key
-- returns  1 new (now marked), 0 seen before
local now = clock()
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 's', 'm', 'k', ARGV[2], 'ts', int(now))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
