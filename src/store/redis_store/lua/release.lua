-- release: free the key for a retry, leaving a tombstone that keeps the
-- fence so the next lease's fence is higher.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id
-- ARGV[2]  waiters' channel
-- ARGV[3]  '1' on Cluster (sharded pub/sub), else '0'
-- ARGV[4]  tombstone ttl, ms
-- returns  1 released, 0 the lease was lost (nothing deleted)
local h = redis.call('HMGET', KEYS[1], 's', 't', 'f')
if h[1] ~= 'i' or h[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'r', 'f', h[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
notify(ARGV[2], ARGV[3], 'r')
return 1
