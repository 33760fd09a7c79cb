-- lib.lua: helpers shared by every idemgate script. scripts.rs puts this
-- text in front of each script, so each one defines these functions itself
-- (Redis scripts cannot include one another).

-- Redis TIME as (milliseconds, microseconds) since the epoch: the store's
-- clock, never the caller's.
local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- A fence from the clock's microseconds, strictly above the key's last
-- fence (`last`, a string or nil), so fences rise per key even when the
-- clock steps back.
local function next_fence(us, last)
  local fence = us
  last = tonumber(last)
  if last and last >= fence then fence = last + 1 end
  return fence
end

local function int(n)
  return string.format('%d', n)
end

-- Wakes waiting duplicates: PUBLISH on standalone Redis, SPUBLISH (same
-- slot as the record) on Cluster.
local function notify(channel, sharded, message)
  if sharded == '1' then
    redis.call('SPUBLISH', channel, message)
  else
    redis.call('PUBLISH', channel, message)
  end
end

-- An HTTP idempotency record is one string, its layout by state (the lease
-- id and the fingerprint are 32 bytes each, the rest decimal):
--   'i' lease fingerprint fence ' ' lease_end_ms
--   'u' fingerprint fence ' ' since_ms ' ' next_check_ms ' ' cause
--   'c' fence ' ' encoded record
--   'r' fence                         (a release's tombstone)
-- One string costs Redis less than a hash of the same fields: one value to
-- read and write, its time to live set with it (benches/RESULTS.md,
-- "Design 3, third step").
local function decode(v)
  local s = string.sub(v, 1, 1)
  if s == 'i' then
    local sp = string.find(v, ' ', 66, true)
    return {s = s, t = string.sub(v, 2, 33), p = string.sub(v, 34, 65),
      f = string.sub(v, 66, sp - 1), l = string.sub(v, sp + 1)}
  elseif s == 'c' then
    local sp = string.find(v, ' ', 2, true)
    return {s = s, f = string.sub(v, 2, sp - 1), r = string.sub(v, sp + 1)}
  elseif s == 'u' then
    local a = string.find(v, ' ', 34, true)
    local b = string.find(v, ' ', a + 1, true)
    local c = string.find(v, ' ', b + 1, true)
    return {s = s, p = string.sub(v, 2, 33), f = string.sub(v, 34, a - 1),
      ts = string.sub(v, a + 1, b - 1), n = string.sub(v, b + 1, c - 1),
      c = string.sub(v, c + 1)}
  end
  return {s = s, f = string.sub(v, 2)}
end

-- Earlier idemgate versions kept a record as a hash of these fields: such
-- a record (GET answers it with WRONGTYPE) reads the same, and is a string
-- once written again, so a rolling upgrade loses no record.
local function from_hash(key)
  local h = redis.call('HMGET', key, 's', 't', 'f', 'p', 'r', 'l', 'c', 'ts', 'n')
  if not h[1] then return nil end
  return {s = h[1], t = h[2], f = h[3], p = h[4], r = h[5], l = h[6], c = h[7],
    ts = h[8], n = h[9]}
end

-- A record's fields from what `redis.pcall('GET', key)` answered (an
-- error table for a hash), or nil when the key holds none.
local function fields(key, v)
  if type(v) == 'table' then return from_hash(key) end
  if not v then return nil end
  return decode(v)
end

-- A record's fields, or nil when the key holds none.
local function load(key)
  return fields(key, redis.pcall('GET', key))
end

-- A completed record's whole value, `c` fence ' ' record, as begin returns
-- it: the store takes the record from behind the space, so a replay's body
-- is not copied once more inside Redis (a 64 KiB record cost 66 % more
-- when it was).
local function completed(h)
  return 'c' .. h.f .. ' ' .. h.r
end

-- Writes a record over whatever the key held; with no `px` it keeps the
-- key's time to live. A lease written without an end (by an earlier
-- version) keeps none: it lives only as long as its key.
local function save(key, h, px)
  local v
  if h.s == 'i' then v = 'i' .. h.t .. h.p .. h.f .. ' ' .. (h.l or '')
  elseif h.s == 'c' then v = 'c' .. h.f .. ' ' .. h.r
  elseif h.s == 'u' then v = 'u' .. h.p .. h.f .. ' ' .. h.ts .. ' ' .. h.n .. ' ' .. h.c
  else v = 'r' .. h.f end
  if px then
    redis.call('SET', key, v, 'PX', px)
  else
    redis.call('SET', key, v, 'KEEPTTL')
  end
end
