-- The same listing, the accounts found through a set of ids: KEYS[1] is the set,
-- each member <id> names the hash iad:<id>. Rows come in ascending id order.
local ids = redis.call('SMEMBERS', KEYS[1])
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local skip = tonumber(ARGV[1]) or 0
local size = tonumber(ARGV[2]) or #ids
local rows = {}
for position = skip + 1, math.min(#ids, skip + size) do
  rows[#rows + 1] = redis.call('HGETALL', 'iad:' .. ids[position])
end
return {#ids, skip, rows}
