-- get: a record's fields for inspection.
-- KEYS[1]  the record hash
-- returns  {state, lease id, fence, fp, encoded record, cause, since_ms,
--          next_check_ms, pttl}; missing fields are nil in place, so the
--          pttl is always last
local h = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'p', 'r', 'c', 'ts', 'n')
return {h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], redis.call('PTTL', KEYS[1])}
