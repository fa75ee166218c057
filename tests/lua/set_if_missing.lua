-- Set field ARGV[1] of hash KEYS[1] to ARGV[2] unless the field exists, and record
-- the marker field ARGV[3] = ARGV[4] with it. Returns 1 when it wrote, 0 otherwise.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
