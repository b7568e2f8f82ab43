-- Acquire a lease with a fresh fencing token.
--
-- KEYS[1]  lease hash {holder, token}, expiring after the TTL
-- KEYS[2]  fence counter of this lease (kept without a TTL)
-- ARGV[1]  holder id
-- ARGV[2]  lease TTL in milliseconds
--
-- Returns {1, token} when acquired, {0, pttl_ms} when another holder has it.
-- A holder that acquires a lease it already holds gets a new token, which
-- fences every write still in flight under the old one.
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= ARGV[1] then
  return {0, redis.call('PTTL', KEYS[1])}
end

-- The token is max(last + 1, now in microseconds). Seeding from the server
-- clock keeps tokens increasing across FLUSHALL or a restart without
-- persistence, where the counter itself is gone.
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local token
if last + 1 >= now_us then
  token = redis.call('INCR', KEYS[2])
else
  token = now_us
  redis.call('SET', KEYS[2], string.format('%.0f', token))
end

redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', string.format('%.0f', token))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}
