-- dedup_inspect: a dedup record's fields, its ttl and the store's clock.
-- KEYS[1]  the dedup record hash
-- returns  {s, lid, fe, at, lu, fp, wk, r, e, ts, pttl, now_ms}; missing
--          fields are nil in place
local now = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'lid', 'fe', 'at', 'lu', 'fp', 'wk', 'r', 'e', 'ts')
return {h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], redis.call('PTTL', KEYS[1]), now}
