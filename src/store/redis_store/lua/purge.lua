-- purge: delete a record whatever its state and wake its waiters.
-- KEYS[1]  the record
-- ARGV[1]  waiters' channel
-- ARGV[2]  '1' on Cluster (sharded pub/sub), else '0'
-- ARGV[3]  the replay caches' invalidation channel, or '' (none)
-- returns  1 deleted, 0 there was none
local n = redis.call('DEL', KEYS[1])
if n > 0 then
  notify(ARGV[1], ARGV[2], 'p')
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], KEYS[1]) end
end
return n
