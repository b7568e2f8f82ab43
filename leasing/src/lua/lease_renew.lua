-- Extend a lease that the caller still holds under the given token.
--
-- KEYS[1]  lease hash {holder, token}
-- ARGV[1]  holder id
-- ARGV[2]  fencing token, in decimal
-- ARGV[3]  lease TTL in milliseconds
--
-- Returns 1 when renewed, 0 when the lease is gone (expired or flushed),
-- -1 when another holder or a newer token has it.
local current = redis.call('HMGET', KEYS[1], 'holder', 'token')
if not current[1] then
  return 0
end
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
