#!lua name=spirt
-- Fallback aggregation for servers that cannot load the spirt tensor module (Redis Functions).
-- Tensors are raw little-endian float32 strings, as everywhere in spirt. This path is correct but
-- slow (every float becomes a Lua number) and blocks the server while it runs: prefer the module.
-- The spirt_ref_* functions reproduce the released SPIRT code's approach (JSON lists decoded in Lua)
-- and exist only as the benchmark's reference point.

local CHUNK = 1024
local FMT = nil  -- built on first use: the standard libraries are not reachable while the library loads

local function fmt()
  if FMT == nil then FMT = '<' .. string.rep('f', CHUNK) end
  return FMT
end

local function check_len(key, s)
  if not s then return redis.error_reply('ERR spirt: key ' .. key .. ' does not exist') end
  if type(s) ~= 'string' or #s == 0 or #s % 4 ~= 0 then
    return redis.error_reply('ERR spirt: key ' .. key .. ' is not a float32 tensor (' .. tostring(#s) .. ' bytes)')
  end
  return nil
end

local function decode(s)
  local n = #s / 4
  local out = {}
  local i, pos = 0, 1
  while n - i >= CHUNK do
    local vals = {struct.unpack(fmt(), s, pos)}
    for j = 1, CHUNK do out[i + j] = vals[j] end
    i = i + CHUNK
    pos = pos + CHUNK * 4
  end
  while i < n do
    local v = struct.unpack('<f', s, pos)
    i = i + 1
    out[i] = v
    pos = pos + 4
  end
  return out
end

local function encode(t, n)
  local parts = {}
  local i = 0
  while n - i >= CHUNK do
    parts[#parts + 1] = struct.pack(fmt(), unpack(t, i + 1, i + CHUNK))
    i = i + CHUNK
  end
  while i < n do
    i = i + 1
    parts[#parts + 1] = struct.pack('<f', t[i])
  end
  return table.concat(parts)
end

local function num(args, i, name)
  local v = tonumber(args[i])
  if v == nil or v ~= v or v == math.huge or v == -math.huge then
    error('ERR spirt: ' .. name .. ' must be a finite number, got ' .. tostring(args[i]))
  end
  return v
end

-- Sum of the sources (keys[first..]) divided by their count, as a Lua table.
local function mean_of(keys, first)
  local acc, n
  local k = #keys - first + 1
  if k < 1 then error('ERR spirt: at least one source key is required') end
  for idx = first, #keys do
    local s = redis.call('GET', keys[idx])
    local err = check_len(keys[idx], s)
    if err then error(err.err) end
    if acc == nil then
      n = #s / 4
      acc = decode(s)
    else
      if #s / 4 ~= n then error('ERR spirt: key ' .. keys[idx] .. ' has a different length') end
      local t = decode(s)
      for j = 1, n do acc[j] = acc[j] + t[j] end
    end
  end
  for j = 1, n do acc[j] = acc[j] / k end
  return acc, n
end

-- torch.optim.SGD step on Lua tables; buf_t nil means "no momentum state yet".
local function sgd_step(p, g, buf_t, n, lr, mu, wd)
  local new_buf = nil
  if mu > 0 then new_buf = buf_t or {} end
  for j = 1, n do
    local d = g[j] + wd * p[j]
    if mu > 0 then
      if buf_t then d = mu * buf_t[j] + d end
      new_buf[j] = d
    end
    p[j] = p[j] - lr * d
  end
  return new_buf
end

-- keys: dst, src1 [src2 ...]   -> dst = mean(src)
local function spirt_avg(keys, args)
  local acc, n = mean_of(keys, 2)
  redis.call('SET', keys[1], encode(acc, n))
  return n
end

-- keys: param, buf, grad1 [grad2 ...]; args: lr, momentum, weight_decay
-- param -= lr * SGD(mean(grads)); buf is the momentum state (ignored when momentum is 0).
local function spirt_update(keys, args)
  local lr, mu, wd = num(args, 1, 'lr'), num(args, 2, 'momentum'), num(args, 3, 'weight_decay')
  local g, n = mean_of(keys, 3)
  local ps = redis.call('GET', keys[1])
  local err = check_len(keys[1], ps)
  if err then return err end
  if #ps / 4 ~= n then return redis.error_reply('ERR spirt: parameter length differs from gradient length') end
  local p = decode(ps)
  local buf_t = nil
  if mu > 0 then
    local bs = redis.call('GET', keys[2])
    if bs then buf_t = decode(bs) end
  end
  local new_buf = sgd_step(p, g, buf_t, n, lr, mu, wd)
  redis.call('SET', keys[1], encode(p, n))
  if new_buf then redis.call('SET', keys[2], encode(new_buf, n)) end
  return n
end

-- keys: state, vec; args: beta   -> vec = beta*state + (1-beta)*vec (vec as is without state); state = vec
local function spirt_peer_momentum(keys, args)
  local beta = num(args, 1, 'beta')
  local vs = redis.call('GET', keys[2])
  local err = check_len(keys[2], vs)
  if err then return err end
  local ms = redis.call('GET', keys[1])
  if ms then
    err = check_len(keys[1], ms)
    if err then return err end
    if #ms ~= #vs then return redis.error_reply('ERR spirt: peer momentum length differs from vector length') end
    local m, v, n = decode(ms), decode(vs), #vs / 4
    for j = 1, n do v[j] = beta * m[j] + (1 - beta) * v[j] end
    vs = encode(v, n)
    redis.call('SET', keys[2], vs)
  end
  redis.call('SET', keys[1], vs)
  return #vs / 4
end

-- The released SPIRT approach: gradients and parameters as JSON lists, averaged in Lua.
-- keys: param_json, buf_json, grad_json1 [...]; args: lr, momentum, weight_decay
local function spirt_ref_update(keys, args)
  local lr, mu, wd = num(args, 1, 'lr'), num(args, 2, 'momentum'), num(args, 3, 'weight_decay')
  local k = #keys - 2
  local acc, n
  for idx = 3, #keys do
    local t = cjson.decode(redis.call('GET', keys[idx]))
    if acc == nil then
      acc, n = t, #t
    else
      for j = 1, n do acc[j] = acc[j] + t[j] end
    end
  end
  for j = 1, n do acc[j] = acc[j] / k end
  local p = cjson.decode(redis.call('GET', keys[1]))
  local buf_t = nil
  if mu > 0 then
    local bs = redis.call('GET', keys[2])
    if bs then buf_t = cjson.decode(bs) end
  end
  local new_buf = sgd_step(p, acc, buf_t, n, lr, mu, wd)
  redis.call('SET', keys[1], cjson.encode(p))
  if new_buf then redis.call('SET', keys[2], cjson.encode(new_buf)) end
  return n
end

redis.register_function('spirt_avg', spirt_avg)
redis.register_function('spirt_update', spirt_update)
redis.register_function('spirt_ref_update', spirt_ref_update)
redis.register_function('spirt_peer_momentum', spirt_peer_momentum)
