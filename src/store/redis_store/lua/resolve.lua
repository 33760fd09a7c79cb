-- resolve: settle an unknown record, named by its fence: as completed (the
-- upstream or an operator knows its answer) or released (it did not run).
-- KEYS[1]  the record
-- ARGV[1]  fence of the unknown record
-- ARGV[2]  'complete' or 'release'
-- ARGV[3]  encoded record ('complete'), or ''
-- ARGV[4]  record ttl, ms ('complete')
-- ARGV[5]  waiters' channel
-- ARGV[6]  '1' on Cluster (sharded pub/sub), else '0'
-- ARGV[7]  tombstone ttl, ms ('release': keeps the fence)
-- returns  1 settled, 0 not unknown with that fence (nothing written)
local h = load(KEYS[1])
if not h or h.s ~= 'u' or h.f ~= ARGV[1] then return 0 end
if ARGV[2] == 'complete' then
  save(KEYS[1], {s = 'c', f = h.f, r = ARGV[3]}, ARGV[4])
else
  save(KEYS[1], {s = 'r', f = h.f}, ARGV[7])
end
notify(ARGV[5], ARGV[6], 's')
return 1
