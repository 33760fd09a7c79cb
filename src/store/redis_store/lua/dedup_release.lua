-- dedup_release: give the message back for a retry, or fail it.
-- KEYS[1]  the dedup record hash
-- ARGV[1]  lease id
-- ARGV[2]  'retry' or 'permanent'
-- ARGV[3]  error text, or ''
-- ARGV[4]  retention of a pending record, ms
-- ARGV[5]  retention of a dead letter, ms
-- returns  {0} the lease was lost, {1} pending again, {2, failed_at_ms} failed
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'lid')
if h[1] ~= 'l' or h[2] ~= ARGV[1] then return {0} end
redis.call('HDEL', KEYS[1], 'lid', 'lu', 'wk', 'e')
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'e', ARGV[3]) end
if ARGV[2] == 'permanent' then
  redis.call('HSET', KEYS[1], 's', 'f', 'ts', int(now))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {2, now}
end
redis.call('HSET', KEYS[1], 's', 'p')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1}
