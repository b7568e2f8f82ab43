-- Take a concurrency slot if the limit allows it; never waits.
--
-- KEYS[1]  sorted set the limit applies to: the function's own set when it
--          has reserved concurrency, the shared unreserved pool otherwise
-- KEYS[2]  the function's sorted set (may equal KEYS[1])
-- KEYS[3]  the account-wide sorted set
-- ARGV[1]  slot id (member)
-- ARGV[2]  limit of KEYS[1]
-- ARGV[3]  slot TTL in milliseconds
--
-- Members are scored by their expiry in milliseconds of the server clock;
-- expired members (crashed holders) are pruned here, so a lost slot frees
-- itself after its TTL without any reaper.
--
-- Returns {1, expires_at_ms, function_in_use, account_in_use, pruned} when
-- acquired, {0, limit_in_use, function_in_use, account_in_use, pruned} when
-- throttled. `pruned` counts expired slots removed from the account set.
local function int(x) return string.format('%.0f', x) end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])

local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', int(now))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
if KEYS[2] ~= KEYS[1] then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
end

local in_use = redis.call('ZCARD', KEYS[1])
if in_use >= tonumber(ARGV[2]) then
  return {0, in_use, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]), pruned}
end

local expires = now + ttl
local keys = {KEYS[1], KEYS[3]}
if KEYS[2] ~= KEYS[1] then
  keys[3] = KEYS[2]
end
for _, key in ipairs(keys) do
  redis.call('ZADD', key, int(expires), ARGV[1])
  -- The set outlives its newest member, never a member's expiry.
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return {1, expires, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]), pruned}
