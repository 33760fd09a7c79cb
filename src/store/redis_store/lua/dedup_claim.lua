-- dedup_claim: the claim rules of idempotency/dedup.rs, atomically.
-- KEYS[1]  the dedup record hash
-- ARGV[1]  new lease id (used only if the claim acquires)
-- ARGV[2]  lease, ms
-- ARGV[3]  fingerprint, or '' for none
-- ARGV[4]  max attempts
-- ARGV[5]  worker name, or ''
-- ARGV[6]  retention of a leased/pending record, ms
-- ARGV[7]  retention of a dead letter, ms
-- ARGV[8]  the message key (kept for dead-letter listings)
-- returns  {'acquired', fence, attempt, recovered 0|1}
--          {'completed', result|false, completed_at_ms}
--          {'failed', error|false, attempts, failed_at_ms}      (was failed)
--          {'failed_new', error|false, attempts, failed_at_ms}  (failed now)
--          {'in_progress', retry_after_ms}
--          {'mismatch'}
local now, us = clock()
local h = redis.call('HMGET', KEYS[1], 's', 'fe', 'at', 'lu', 'fp', 'r', 'e', 'ts')
local s, fe, at, lu, fp, r, e, ts = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
local given = ARGV[3]
local differs = fp and given ~= '' and fp ~= given
if s == 'c' then
  if differs then return {'mismatch'} end
  return {'completed', r, tonumber(ts)}
end
if s == 'm' then return {'completed', false, tonumber(ts)} end
if s == 'f' then return {'failed', e, tonumber(at), tonumber(ts)} end
local attempts, recovered, err = 0, 0, false
if s == 'l' then
  if differs then return {'mismatch'} end
  if tonumber(lu) > now then return {'in_progress', tonumber(lu) - now} end
  attempts, recovered, err = tonumber(at), 1, 'lease expired during attempt ' .. at
elseif s == 'p' then
  if differs then return {'mismatch'} end
  attempts, err = tonumber(at), e
end
if attempts >= tonumber(ARGV[4]) and (s == 'l' or s == 'p') then
  redis.call('HDEL', KEYS[1], 'lid', 'lu', 'wk', 'e')
  redis.call('HSET', KEYS[1], 's', 'f', 'ts', int(now))
  if err then redis.call('HSET', KEYS[1], 'e', err) end
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  return {'failed_new', err, attempts, now}
end
local f = int(next_fence(us, fe))
local keepfp = fp or (given ~= '' and given)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'l', 'k', ARGV[8], 'lid', ARGV[1], 'fe', f,
  'at', int(attempts + 1), 'lu', int(now + tonumber(ARGV[2])))
if keepfp then redis.call('HSET', KEYS[1], 'fp', keepfp) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'wk', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {'acquired', f, attempts + 1, recovered}
