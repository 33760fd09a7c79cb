-- complete: store the response for the current lease and wake waiters.
-- KEYS[1]  the record
-- ARGV[1]  lease id
-- ARGV[2]  encoded record
-- ARGV[3]  record ttl, ms
-- ARGV[4]  waiters' channel
-- ARGV[5]  '1' on Cluster (sharded pub/sub), else '0'
-- returns  1 stored, 0 the lease was lost (nothing written)
-- The lease is this build's, so its record is a string (a hash, from an
-- earlier version, answers GET with an error: not this lease either); the
-- record's prefix, 'i' and the lease id, says whether it is still held.
local v = redis.pcall('GET', KEYS[1])
if type(v) ~= 'string' or string.sub(v, 1, 33) ~= 'i' .. ARGV[1] then return 0 end
local sp = string.find(v, ' ', 66, true)
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 66, sp - 1) .. ' ' .. ARGV[2], 'PX', ARGV[3])
notify(ARGV[4], ARGV[5], 'c')
return 1
