-- dedup_list_failed: dead letters after a cursor, oldest first.
-- KEYS[1]  the scope's dead-letter index (sorted set, score failed-at ms)
-- ARGV[1]  cursor's failed-at ms, or '' to start at the beginning
-- ARGV[2]  cursor's key (entries at the cursor's score up to it are skipped)
-- ARGV[3]  how many to return at most
-- returns  {key, score, key, score, ...}
local limit, res, offset = tonumber(ARGV[3]), {}, 0
local from = ARGV[1]
if from == '' then from = '-inf' end
while #res < 2 * limit do
  local batch = redis.call('ZRANGE', KEYS[1], from, '+inf', 'BYSCORE', 'LIMIT', offset, 200, 'WITHSCORES')
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    if ARGV[1] == '' or not (tonumber(batch[i + 1]) == tonumber(ARGV[1]) and batch[i] <= ARGV[2]) then
      table.insert(res, batch[i])
      table.insert(res, batch[i + 1])
      if #res >= 2 * limit then break end
    end
  end
  offset = offset + 200
end
return res
