-- Count the unexpired slots of one sorted set, without writing.
--
-- KEYS[1]  a function's sorted set, the unreserved pool or the account set
--
-- Returns the number of members whose expiry is after now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
