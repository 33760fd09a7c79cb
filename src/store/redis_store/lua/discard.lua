-- discard: delete a completed record only if it still holds the bytes this
-- build could not decode, so a newer record written meanwhile survives.
-- KEYS[1]  the record
-- ARGV[1]  the undecodable record's value, as begin returned it
-- ARGV[2]  the replay caches' invalidation channel, or '' (none)
-- returns  1 deleted, 0 left alone
local h = load(KEYS[1])
if h and h.s == 'c' and completed(h) == ARGV[1] then
  if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
  return redis.call('DEL', KEYS[1])
end
return 0
