-- begin: take the lease of an absent record, or report what holds the key.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id (32 hex)
-- ARGV[2]  request fingerprint (32 bytes)
-- ARGV[3]  lease ttl, ms
-- returns  {'a', fence}            acquired
--          {'i', fence, fp}        in flight under another lease
--          {'c', encoded record}   completed
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'p', 'r')
if h[1] == 'i' then return {'i', h[2], h[3]} end
if h[1] == 'c' then return {'c', h[4]} end
local _, us = clock()
local fence = int(next_fence(us, h[2]))
-- A release tombstone ('r') only kept the fence; replace it.
if h[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 's', 'i', 't', ARGV[1], 'f', fence, 'p', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'a', fence}
