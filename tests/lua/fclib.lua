#!lua name=fclib
-- fcset KEYS[1] field value [field value ...]: HSET, returns the number of new fields.
-- fcget KEYS[1] field: HGET, read-only (callable with FCALL_RO).
redis.register_function('fcset', function(keys, args)
  return redis.call('HSET', keys[1], unpack(args))
end)

redis.register_function{
  function_name = 'fcget',
  callback = function(keys, args)
    return redis.call('HGET', keys[1], args[1])
  end,
  flags = {'no-writes'},
}
