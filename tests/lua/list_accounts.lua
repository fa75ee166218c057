-- An account listing: {total, skip, {row, row, ...}}, each row an account hash's HGETALL.
-- KEYS: the account hashes (iad:<id>) in listing order.
-- ARGV[1]: how many accounts to skip (default 0); ARGV[2]: page size (default: all).
local skip = tonumber(ARGV[1]) or 0
local size = tonumber(ARGV[2]) or #KEYS
local rows = {}
for position = skip + 1, math.min(#KEYS, skip + size) do
  rows[#rows + 1] = redis.call('HGETALL', KEYS[position])
end
return {#KEYS, skip, rows}
