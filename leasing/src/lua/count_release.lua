-- Give a slot back.
--
-- KEYS[1]  limit set the slot was taken from (may equal KEYS[2])
-- KEYS[2]  the function's sorted set
-- KEYS[3]  the account-wide sorted set
-- ARGV[1]  slot id
--
-- Returns {held, function_in_use, account_in_use}: held is 1 when the slot
-- was still there, 0 when it had already been pruned after its expiry.
local held = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {held, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
