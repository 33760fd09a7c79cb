-- mark_unknown: the current lease's request may have run, but no answer
-- was stored: keep the key (and its fence) as unknown and wake waiters.
-- KEYS[1]  the record
-- ARGV[1]  lease id
-- ARGV[2]  cause: 'timeout', 'reset' or 'status <n>'
-- ARGV[3]  how long to keep it, ms
-- ARGV[4]  waiters' channel
-- ARGV[5]  '1' on Cluster (sharded pub/sub), else '0'
-- returns  1 marked, 0 the lease was lost (nothing written)
local now = clock()
local h = load(KEYS[1])
if not h or h.s ~= 'i' or h.t ~= ARGV[1] then return 0 end
save(KEYS[1], {s = 'u', p = h.p, f = h.f, c = ARGV[2], ts = int(now), n = '0'}, ARGV[3])
notify(ARGV[4], ARGV[5], 'u')
return 1
