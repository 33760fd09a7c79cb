-- complete_hash.lua: src/store/redis_store/lua/complete.lua as it was while a record
-- was a hash (before 2026-12-03), for benches/redis_record.sh to weigh the
-- string record against; lua/lib.lua goes in front, as for every script.
-- complete: store the response for the current lease and wake waiters.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id
-- ARGV[2]  encoded record
-- ARGV[3]  record ttl, ms
-- ARGV[4]  waiters' channel
-- ARGV[5]  '1' on Cluster (sharded pub/sub), else '0'
-- returns  1 stored, 0 the lease was lost (nothing written)
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'i' or h[2] ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 't', 'p', 'l')
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
notify(ARGV[4], ARGV[5], 'c')
return 1
