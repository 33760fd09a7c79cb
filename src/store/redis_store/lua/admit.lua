-- admit: take one token from a caller's fair-share bucket (new keys only).
-- KEYS[1]  the caller scope's bucket hash
-- ARGV[1]  tokens per second
-- ARGV[2]  burst (most tokens held)
-- ARGV[3]  bucket ttl, ms (time to refill from empty)
-- returns  0 admitted, or the ms to wait for the next token
local now = clock()
local h = redis.call('HMGET', KEYS[1], 't', 'a')
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(h[1]) or burst
local at = tonumber(h[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) / 1000 * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'a', int(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait
