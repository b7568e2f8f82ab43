-- Push back the expiry of a slot that has not expired yet.
--
-- KEYS[1]  limit set the slot was taken from (may equal KEYS[2])
-- KEYS[2]  the function's sorted set
-- KEYS[3]  the account-wide sorted set
-- ARGV[1]  slot id
-- ARGV[2]  slot TTL in milliseconds
--
-- Returns the new expiry in milliseconds, or 0 when the slot had already
-- expired: its capacity may have been handed out again, so it cannot come back.
local function int(x) return string.format('%.0f', x) end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])

local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end

local expires = now + ttl
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3]}) do
  redis.call('ZADD', key, 'XX', int(expires), ARGV[1])
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return expires
