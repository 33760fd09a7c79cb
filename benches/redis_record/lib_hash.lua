-- lib_hash.lua: src/store/redis_store/lua/lib.lua as it was while a record
-- was a hash (before 2026-12-03), for benches/redis_record.sh to weigh the
-- string record against.
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
