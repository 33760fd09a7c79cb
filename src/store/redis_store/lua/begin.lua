-- begin: take the lease of an absent record, or report what holds the key.
-- KEYS[1]  the record
-- ARGV[1]  lease id (32 hex)
-- ARGV[2]  request fingerprint (32 bytes)
-- ARGV[3]  lease ttl, ms
-- ARGV[4]  ttl of the in-flight record, ms (longer than the lease when
--          lapsed leases are held, so a lapse can be seen)
-- ARGV[5]  hold: ms to keep a lapsed lease as unknown, or '' to take it over
-- ARGV[6]  reconcile every: ms between reconcile attempts, or '' for none
-- returns  {'a', fence}                       acquired
--          {'i', fence, fp}                   in flight under a live lease
--          {'c', 'c' fence ' ' encoded record, pttl ms}   completed
--          {'u', fence, fp, cause, since_ms, next_check_ms, reconcile 0|1,
--           held now 0|1 (this call found the lease lapsed)}
local now, us = clock()
local v = redis.pcall('GET', KEYS[1])
-- A completed record goes back as it is held (a replay's path).
if type(v) == 'string' and string.byte(v) == 99 then
  return {'c', v, redis.call('PTTL', KEYS[1])}
end
local h = fields(KEYS[1], v)
local f
if h then
  local s, p = h.s, h.p
  f = h.f
  -- A record written without a lease end lives only as long as its lease.
  local lease_until = tonumber(h.l)
  local held_now = 0
  if s == 'i' and (lease_until == nil or lease_until > now) then return {'i', f, p} end
  -- An earlier build's hash: its value as a string would hold it.
  if s == 'c' then return {'c', completed(h), redis.call('PTTL', KEYS[1])} end
  if s == 'i' and ARGV[5] ~= '' then
    -- The holder stopped renewing after it forwarded: the request may have
    -- run. Hold the key as unknown rather than run it again.
    h = {s = 'u', p = p, f = f, c = 'lapsed', ts = int(now), n = '0'}
    save(KEYS[1], h, ARGV[5])
    s, held_now = 'u', 1
  end
  if s == 'u' then
    local n = tonumber(h.n) or 0
    if ARGV[6] ~= '' and now >= n then
      n = now + tonumber(ARGV[6])
      h.n = int(n)
      save(KEYS[1], h)
      return {'u', f, p, h.c, h.ts, int(n), 1, held_now}
    end
    return {'u', f, p, h.c, h.ts, int(n), 0, held_now}
  end
end
-- Absent, a release tombstone (it only kept the fence), or a lapsed lease
-- taken over: the new key's path writes its string at once.
local fence = int(next_fence(us, f))
redis.call('SET', KEYS[1], 'i' .. ARGV[1] .. ARGV[2] .. fence .. ' '
  .. int(now + tonumber(ARGV[3])), 'PX', ARGV[4])
return {'a', fence}
