-- mark_unknown: the current lease's request may have run, but no answer
-- was stored: keep the key (and its fence) as unknown and wake waiters.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id
-- ARGV[2]  cause: 'timeout', 'reset' or 'status <n>'
-- ARGV[3]  how long to keep it, ms
-- ARGV[4]  waiters' channel
-- ARGV[5]  '1' on Cluster (sharded pub/sub), else '0'
-- returns  1 marked, 0 the lease was lost (nothing written)
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'i' or h[2] ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 't', 'l')
redis.call('HSET', KEYS[1], 's', 'u', 'c', ARGV[2], 'ts', int(now), 'n', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
notify(ARGV[4], ARGV[5], 'u')
return 1
