-- get: a record's fields for inspection.
-- KEYS[1]  the record
-- returns  {state, lease id, fence, fp, encoded record, cause, since_ms,
--          next_check_ms, pttl}; missing fields are nil in place (false
--          here: a Lua nil would end the reply), so the pttl is always last
local h = load(KEYS[1]) or {}
local function field(v) return v or false end
return {field(h.s), field(h.t), field(h.f), field(h.p), field(h.r), field(h.c),
  field(h.ts), field(h.n), redis.call('PTTL', KEYS[1])}
