-- dedup_delete_failed: delete a record only if it is (still) a dead letter.
-- KEYS[1]  the dedup record hash
-- returns  1 deleted, 0 left alone
if redis.call('HGET', KEYS[1], 's') == 'f' then return redis.call('DEL', KEYS[1]) end
return 0
