-- in_flight: the fence of a record in flight, for a waiting duplicate's
-- check; reads no more of a completed record than its first byte.
-- KEYS[1]  the record
-- returns  the fence while in flight, else nil
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'string' then
  if string.byte(v) ~= 105 then return nil end -- 'i'
  return decode(v).f
end
local h = fields(KEYS[1], v)
if h and h.s == 'i' then return h.f end
return nil
