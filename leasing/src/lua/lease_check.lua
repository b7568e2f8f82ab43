-- Tell whether a fencing token is the current token of a lease.
--
-- KEYS[1]  lease hash {holder, token}
-- ARGV[1]  fencing token, in decimal
--
-- Returns 1 when current, 0 otherwise (another token, or no lease at all).
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  return 1
end
return 0
