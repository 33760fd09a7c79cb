-- dedup_complete: record the outcome for the current lease; idempotent for
-- that lease.
-- KEYS[1]  the dedup record hash
-- ARGV[1]  lease id
-- ARGV[2]  result JSON, or ''
-- ARGV[3]  retention, ms
-- returns  1 recorded (now or before, by this lease), 0 the lease was lost
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] == 'c' and h[2] == ARGV[1] then return 1 end
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'lu', 'wk', 'e')
redis.call('HSET', KEYS[1], 's', 'c', 'ts', int(now))
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'r', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
