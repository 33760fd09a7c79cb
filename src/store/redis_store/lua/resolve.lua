-- resolve: settle an unknown record, named by its fence: as completed (the
-- upstream or an operator knows its answer) or released (it did not run).
-- KEYS[1]  the record hash
-- ARGV[1]  fence of the unknown record
-- ARGV[2]  'complete' or 'release'
-- ARGV[3]  encoded record ('complete'), or ''
-- ARGV[4]  record ttl, ms ('complete')
-- ARGV[5]  waiters' channel
-- ARGV[6]  '1' on Cluster (sharded pub/sub), else '0'
-- ARGV[7]  tombstone ttl, ms ('release': keeps the fence)
-- returns  1 settled, 0 not unknown with that fence (nothing written)
local h = redis.call('HMGET', KEYS[1], 's', 'f')
if h[1] ~= 'u' or h[2] ~= ARGV[1] then return 0 end
if ARGV[2] == 'complete' then
  redis.call('HDEL', KEYS[1], 'p', 'c', 'ts', 'n')
  redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', 'r', 'f', h[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
end
notify(ARGV[5], ARGV[6], 's')
return 1
