-- begin_hash.lua: src/store/redis_store/lua/begin.lua as it was while a record
-- was a hash (before 2026-12-03), for benches/redis_record.sh to weigh the
-- string record against; lua/lib.lua goes in front, as for every script.
-- begin: take the lease of an absent record, or report what holds the key.
-- KEYS[1]  the record hash
-- ARGV[1]  lease id (32 hex)
-- ARGV[2]  request fingerprint (32 bytes)
-- ARGV[3]  lease ttl, ms
-- ARGV[4]  ttl of the in-flight record, ms (longer than the lease when
--          lapsed leases are held, so a lapse can be seen)
-- ARGV[5]  hold: ms to keep a lapsed lease as unknown, or '' to take it over
-- ARGV[6]  reconcile every: ms between reconcile attempts, or '' for none
-- returns  {'a', fence}                       acquired
--          {'i', fence, fp}                   in flight under a live lease
--          {'c', encoded record, pttl ms}     completed
--          {'u', fence, fp, cause, since_ms, next_check_ms, reconcile 0|1,
--           held now 0|1 (this call found the lease lapsed)}
local now, us = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'p', 'r', 'l', 'c', 'ts', 'n')
local s, f, p = h[1], h[2], h[3]
-- A record written without a lease end lives only as long as its lease.
local lease_until = tonumber(h[5])
local held_now = 0
if s == 'i' and (lease_until == nil or lease_until > now) then return {'i', f, p} end
if s == 'c' then return {'c', h[4], redis.call('PTTL', KEYS[1])} end
if s == 'i' and ARGV[5] ~= '' then
  -- The holder stopped renewing after it forwarded: the request may have
  -- run. Hold the key as unknown rather than run it again.
  redis.call('HDEL', KEYS[1], 't', 'l')
  redis.call('HSET', KEYS[1], 's', 'u', 'c', 'lapsed', 'ts', int(now), 'n', '0')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  s, h[6], h[7], h[8], held_now = 'u', 'lapsed', int(now), '0', 1
end
if s == 'u' then
  local n = tonumber(h[8]) or 0
  if ARGV[6] ~= '' and now >= n then
    n = now + tonumber(ARGV[6])
    redis.call('HSET', KEYS[1], 'n', int(n))
    return {'u', f, p, h[6], h[7], int(n), 1, held_now}
  end
  return {'u', f, p, h[6], h[7], int(n), 0, held_now}
end
-- Absent, a release tombstone (it only kept the fence), or a lapsed lease
-- taken over.
local fence = int(next_fence(us, f))
if s then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 's', 'i', 't', ARGV[1], 'f', fence, 'p', ARGV[2],
  'l', int(now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'a', fence}
