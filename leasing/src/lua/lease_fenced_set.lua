-- SET a key only while the writer's fencing token is the lease's current one.
--
-- KEYS[1]  lease hash {holder, token}
-- KEYS[2]  key to write (on Redis Cluster it must share the lease's hash tag)
-- ARGV[1]  fencing token, in decimal
-- ARGV[2]  value
--
-- Returns 1 when written, 0 when fenced (the lease expired or moved on).
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
