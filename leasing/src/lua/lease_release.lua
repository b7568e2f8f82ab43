-- Delete a lease that the caller still holds under the given token.
--
-- KEYS[1]  lease hash {holder, token}
-- ARGV[1]  holder id
-- ARGV[2]  fencing token, in decimal
--
-- Returns 1 when released, 0 when the lease was no longer the caller's.
local current = redis.call('HMGET', KEYS[1], 'holder', 'token')
if current[1] == ARGV[1] and current[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
