-- complete for the string record of begin_string.lua: the path a new key
-- takes, for benches/redis_record.sh. ARGV as complete.lua's 1 to 4.
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'i' or string.sub(v, 2, 33) ~= ARGV[1] then return 0 end
local bar = string.find(v, '|', 34, true)
redis.call('SET', KEYS[1], 'c' .. string.sub(v, 34, bar - 1) .. '|' .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'c')
return 1
