-- Set field ARGV[1] of hash KEYS[1] to ARGV[2] only if that field is missing, and
-- stamp the marker field ARGV[3] with ARGV[4] in the same write.
-- Returns 1 when it wrote, 0 when the field was already there.
--
-- Declared in fieldcrypt.example.yaml, so fieldcrypt encrypts ARGV[2] (and ARGV[4],
-- when the marker field is protected too) before Redis runs the script.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
