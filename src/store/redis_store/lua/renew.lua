-- renew: extend the lease while its holder is current.
-- KEYS[1]  the record
-- ARGV[1]  lease id
-- ARGV[2]  lease ttl, ms
-- returns  1 renewed, 0 the lease was lost
local now = clock()
local h = load(KEYS[1])
if h and h.s == 'i' and h.t == ARGV[1] then
  h.l = int(now + tonumber(ARGV[2]))
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    save(KEYS[1], h, ARGV[2])
  else
    save(KEYS[1], h)
  end
  return 1
end
return 0
