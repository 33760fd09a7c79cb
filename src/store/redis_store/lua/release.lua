-- release: free the key for a retry, leaving a tombstone that keeps the
-- fence so the next lease's fence is higher.
-- KEYS[1]  the record
-- ARGV[1]  lease id
-- ARGV[2]  waiters' channel
-- ARGV[3]  '1' on Cluster (sharded pub/sub), else '0'
-- ARGV[4]  tombstone ttl, ms
-- returns  1 released, 0 the lease was lost (nothing deleted)
local h = load(KEYS[1])
if not h or h.s ~= 'i' or h.t ~= ARGV[1] then return 0 end
save(KEYS[1], {s = 'r', f = h.f}, ARGV[4])
notify(ARGV[2], ARGV[3], 'r')
return 1
