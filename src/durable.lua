#!lua name=__PREFIX__
-- pushwire's durable notices (SPEC section 8), as a Redis 7 function library.
--
-- Template: src/history.rs (library_source) replaces __PREFIX__,
-- __HISTORY_SIZE__ and __HISTORY_TTL_MS__ and loads it with FUNCTION LOAD
-- REPLACE. Bump VERSION whenever the behaviour or the key layout changes: a
-- node never replaces a library with a higher VERSION than its own.
--
--   FCALL    __PREFIX___publish 0 <notice>
--     -> the notice's client id "<epoch>:<ms>-<seq>", or an error reply
--        "BADNOTICE <reason>" (nothing stored, nothing sent).
--   FCALL_RO __PREFIX___history 0 <userId> <since> <limit> [<max_bytes>]
--     -> {"ok"|"missed", <last client id or "">, id1, notice1, id2, ...}
--        "ok": these are all the notices after since (user and broadcast,
--        in id order); "missed": history cannot prove that (no entries).
--        More than limit entries, or more than max_bytes of notices (0:
--        no bound), is "missed" too.
--   FCALL_RO __PREFIX___version 0
--     -> VERSION (integer)
--   FCALL    __PREFIX___presence_update 0 <node> <ttl_ms> <grace_ms> <events channel or "">
--              <"delta"|"rewrite"|"leave"> [<userId> <count>]...
--     -> {live, online events, offline events, more}; see "presence" below.
--   FCALL_RO __PREFIX___presence 0 [<userId>]
--     -> '{"userId":"42","connections":3,"nodes":2}' for a user, or
--        '{"users":U,"connections":C,"nodes":N}' for the fleet (SPEC 9).
--
-- Keys: __PREFIX__:epoch, __PREFIX__:last, __PREFIX__:history:<userId>,
-- __PREFIX__:broadcast; channel __PREFIX__:notices; presence:
-- __PREFIX__:presence:{nodes,conns,stats,leaving,fresh},
-- __PREFIX__:presence:node:<node>, __PREFIX__:presence:user:<userId>. The keys are not
-- declared (numkeys 0), so this library is for standalone/Sentinel Redis,
-- not Redis Cluster.
--
-- Completeness rests on each stream's max-deleted-entry-id: every entry ever
-- removed from a stream, and every entry an earlier incarnation of it could
-- have held, has an id <= it. Redis 7.0 does not raise it when XADD MAXLEN
-- trims (only XDEL does), so publish raises it itself (XSETID MAXDELETEDID)
-- when a stream is created and whenever a trim removed entries.

local VERSION = 2
local PREFIX = '__PREFIX__'
local SIZE = __HISTORY_SIZE__
local TTL_MS = __HISTORY_TTL_MS__

local MAX_NOTICE_BYTES = 1048576 -- notice.rs MAX_NOTICE_BYTES
local MAX_USER_ID_LEN = 256 -- auth.rs MAX_USER_ID_LEN
local MAX_LIMIT = 100000
-- Larger than any seq this library can assign: the predecessor of <ms>-0.
local MAX_SEQ = '18446744073709551615'

local EPOCH_KEY = PREFIX .. ':epoch'
local LAST_KEY = PREFIX .. ':last'
local USER_KEY = PREFIX .. ':history:'
local BROADCAST_KEY = PREFIX .. ':broadcast'
local CHANNEL = PREFIX .. ':notices'

-- Only `redis` exists while the library loads (Redis 7.0): `string`,
-- `math` and `cjson` are reached inside the functions, at call time.

-- ---------------------------------------------------------------- ids

local function fmt_num(n)
  return string.format('%.0f', n)
end

-- "ms-seq" -> ms, seq as numbers (seq may be MAX_SEQ, inexact but larger
-- than any real seq, which is all the comparisons need).
local function parse_id(s)
  local ms, seq = string.match(s, '^(%d+)%-(%d+)$')
  if not ms then
    return nil
  end
  return tonumber(ms), tonumber(seq)
end

local function id_less(ams, aseq, bms, bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end

local function now_ms()
  local t = redis.call('TIME')
  local sec, usec = tonumber(t[1]), tonumber(t[2])
  return sec * 1000 + math.floor(usec / 1000), sec * 1000000 + usec
end

-- A new epoch: the microsecond time in base 36 (about 11 characters).
local function new_epoch(us)
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  local out = ''
  repeat
    local d = us % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    us = (us - d) / 36
  until us == 0
  return out
end

-- ---------------------------------------------------------- validation
-- The same rules as src/notice.rs parse(), and never laxer: a notice this
-- accepts but the nodes refused would be in history yet never delivered
-- live. cjson checks the structure; a small lexer refuses what cjson lets
-- through and serde_json does not (hex, leading zeros, inf/nan, raw
-- control characters in strings) and gives the raw
-- text of the routing fields (duplicates, 42 vs 42.0, integers past 2^53).

local function valid_utf8(s)
  local i = string.find(s, '[\128-\255]')
  while i do
    local j
    if string.find(s, '^[\194-\223][\128-\191]', i) then
      j = i + 2
    elseif string.find(s, '^\224[\160-\191][\128-\191]', i)
      or string.find(s, '^[\225-\236\238\239][\128-\191][\128-\191]', i)
      or string.find(s, '^\237[\128-\159][\128-\191]', i) then
      j = i + 3
    elseif string.find(s, '^\240[\144-\191][\128-\191][\128-\191]', i)
      or string.find(s, '^[\241-\243][\128-\191][\128-\191][\128-\191]', i)
      or string.find(s, '^\244[\128-\143][\128-\191][\128-\191]', i) then
      j = i + 4
    else
      return false
    end
    i = string.find(s, '[\128-\255]', j)
  end
  return true
end

-- Token checks outside and inside strings; nil when fine, else a reason.
local function lex_check(s)
  local i = 1
  while true do
    local j = string.find(s, '[^ \t\n\r{}%[%]:,]', i)
    if not j then
      return nil
    end
    local c = string.sub(s, j, j)
    if c == '"' then
      local k = j + 1
      while true do
        local _, e = string.find(s, '^[^"\\%z\1-\31]*', k)
        k = e + 1
        local d = string.sub(s, k, k)
        if d == '"' then
          break
        elseif d == '\\' then
          k = k + 2 -- the escape itself is checked by cjson
        elseif d == '' then
          return 'EOF while parsing a string'
        else
          return 'control character (\\u0000-\\u001F) found while parsing a string at byte ' .. k
        end
      end
      i = k + 1
    elseif string.find(c, '[%-%d]') then
      local _, e = string.find(s, '^%-?%d+', j)
      if not e or string.find(s, '^%-?0%d', j) then
        return 'invalid number at byte ' .. j
      end
      local k = e + 1
      local _, f = string.find(s, '^%.%d+', k)
      if f then
        k = f + 1
      end
      local _, x = string.find(s, '^[eE][%+%-]?%d+', k)
      if x then
        k = x + 1
      end
      i = k
    else
      local a, b = string.find(s, '^%a+', j)
      local w = a and string.sub(s, a, b)
      if w ~= 'true' and w ~= 'false' and w ~= 'null' then
        return 'expected value at byte ' .. j
      end
      i = b + 1
    end
  end
end

-- These walk text that cjson has already accepted, so they can assume it
-- is well formed.
local function skip_string(s, i) -- i: the opening quote; returns the closing one
  local k = i + 1
  while true do
    local j = string.find(s, '["\\]', k)
    if string.sub(s, j, j) == '"' then
      return j
    end
    k = j + 2
  end
end

local function skip_value(s, i) -- i: the value's first byte; returns its last
  local c = string.sub(s, i, i)
  if c == '"' then
    return skip_string(s, i)
  elseif c == '{' or c == '[' then
    local depth, k = 0, i
    while true do
      local j = string.find(s, '["{}%[%]]', k)
      local d = string.sub(s, j, j)
      if d == '"' then
        j = skip_string(s, j)
      elseif d == '{' or d == '[' then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then
          return j
        end
      end
      k = j + 1
    end
  end
  local _, e = string.find(s, '^[^ \t\n\r,%]}]+', i)
  return e
end

-- The direct members of the object or array opening at i: a list of
-- {raw key or false, value start, value end}.
local function members(s, i)
  local object = string.sub(s, i, i) == '{'
  local out = {}
  local k = i + 1
  while true do
    local j = string.find(s, '[^ \t\n\r]', k)
    local c = string.sub(s, j, j)
    if c == '}' or c == ']' then
      return out
    end
    if c == ',' then
      j = string.find(s, '[^ \t\n\r]', j + 1)
    end
    local key = false
    if object then
      local ke = skip_string(s, j)
      key = string.sub(s, j, ke)
      j = string.find(s, '[^ \t\n\r]', ke + 1) -- the colon
      j = string.find(s, '[^ \t\n\r]', j + 1)
    end
    local ve = skip_value(s, j)
    out[#out + 1] = { key, j, ve }
    k = ve + 1
  end
end

-- notice.rs user_id(): a non-empty string of at most 256 bytes, or an
-- integer (i64 or u64, as serde_json has it) in decimal.
local function user_id(raw)
  if string.sub(raw, 1, 1) == '"' then
    local v = cjson.decode(raw)
    if #v >= 1 and #v <= MAX_USER_ID_LEN then
      return v
    end
    return nil
  end
  if not string.find(raw, '^%-?%d+$') then
    return nil -- a fraction or an exponent makes it a float in serde_json
  end
  if string.sub(raw, 1, 1) == '-' then
    local d = string.sub(raw, 2)
    if d == '0' or #d > 19 or (#d == 19 and d > '9223372036854775808') then
      return nil -- "-0" is a float in serde_json; beyond i64 too
    end
  elseif #raw > 20 or (#raw == 20 and raw > '18446744073709551615') then
    return nil
  end
  return raw -- canonical already: JSON has no leading zeros
end

local ROUTES = { userId = true, userIds = true, broadcast = true }

-- Returns a list of stream keys (possibly empty), or nil and a reason with
-- the texts of notice.rs NoticeError.
local function route(s)
  if #s > MAX_NOTICE_BYTES then
    return nil, 'notice of ' .. #s .. ' bytes is over the ' .. MAX_NOTICE_BYTES .. '-byte limit'
  end
  if not valid_utf8(s) then
    return nil, 'notice is not valid UTF-8'
  end
  local ok, err = pcall(cjson.decode, s)
  local start = string.find(s, '[^ \t\n\r\f]')
  if not start or string.sub(s, start, start) ~= '{' then
    if ok then
      return nil, 'notice is not a JSON object'
    end
    return nil, 'notice is not valid JSON: ' .. tostring(err)
  end
  if not ok then
    return nil, 'notice is not valid JSON: ' .. tostring(err)
  end
  local bad = lex_check(s)
  if bad then
    return nil, 'notice is not valid JSON: ' .. bad
  end
  local found, n = {}, 0
  for _, m in ipairs(members(s, start)) do
    local key = cjson.decode(m[1])
    if ROUTES[key] then
      if found[key] then
        return nil, 'notice is not valid JSON: duplicate field `' .. key .. '`'
      end
      found[key] = string.sub(s, m[2], m[3])
      n = n + 1
    end
  end
  if n == 0 then
    return nil, 'notice has no routing field (userId, userIds or broadcast)'
  elseif n > 1 then
    return nil, 'notice has more than one routing field (userId, userIds, broadcast)'
  end
  if found.userId then
    local u = user_id(found.userId)
    if not u then
      return nil, 'userId must be a non-empty string or an integer'
    end
    return { USER_KEY .. u }
  elseif found.userIds then
    local raw = found.userIds
    if string.sub(raw, 1, 1) ~= '[' then
      return nil, 'userIds must be an array'
    end
    local keys, seen = {}, {}
    for _, m in ipairs(members(raw, 1)) do
      local u = user_id(string.sub(raw, m[2], m[3]))
      if not u then
        return nil, 'userIds must hold only non-empty strings or integers'
      end
      if not seen[u] then
        seen[u] = true
        keys[#keys + 1] = USER_KEY .. u
      end
    end
    return keys -- an empty list is a valid notice to nobody, as in notice.rs
  elseif found.broadcast == 'true' then
    return { BROADCAST_KEY }
  end
  return nil, 'broadcast must be true'
end

-- ------------------------------------------------------------- publish

-- The id just below "ms-seq": a max-deleted-entry-id that covers every
-- entry older than it.
local function pred(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if seq ~= '0' then
    return ms .. '-' .. fmt_num(tonumber(seq) - 1)
  end
  return fmt_num(tonumber(ms) - 1) .. '-' .. MAX_SEQ
end

local function record(key, id, ms, notice, now)
  local fresh = redis.call('EXISTS', key) == 0
  local before = fresh and 0 or redis.call('XLEN', key)
  local added = redis.pcall('XADD', key, 'MAXLEN', '~', SIZE, id, 'n', notice)
  if type(added) == 'table' and added.err then
    -- Only a stream of an earlier epoch (its `last` was lost, not the
    -- stream) can hold an id >= a new one: what it holds is unknown to
    -- every client now, so start it afresh.
    redis.call('DEL', key)
    fresh = true
    redis.call('XADD', key, 'MAXLEN', '~', SIZE, id, 'n', notice)
  end
  if fresh then
    -- An earlier stream of this key may have expired: its entries are at
    -- most (now - TTL)-*, since each stream expires TTL after the id of its
    -- last entry (PEXPIREAT below), so mark all of them as deleted.
    local floor = math.max(0, now - TTL_MS + 1)
    redis.call('XSETID', key, id, 'MAXDELETEDID', fmt_num(floor) .. '-0')
  elseif redis.call('XLEN', key) <= before then
    -- The trim removed entries, all older than the first one left.
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1][1]
    redis.call('XSETID', key, id, 'MAXDELETEDID', pred(first))
  end
  -- Relative to the id, not to the clock: "expired" then bounds the ids
  -- the stream held, which is what history's missing-key rule needs.
  redis.call('PEXPIREAT', key, fmt_num(ms + TTL_MS))
end

local function publish(keys, args)
  if #keys ~= 0 or #args ~= 1 then
    return redis.error_reply('ERR usage: FCALL ' .. PREFIX .. '_publish 0 <notice>')
  end
  local notice = args[1]
  local streams, reason = route(notice)
  if not streams then
    return redis.error_reply('BADNOTICE ' .. reason)
  end
  local now, us = now_ms()
  local epoch = redis.call('GET', EPOCH_KEY)
  local last = redis.call('GET', LAST_KEY)
  local lms, lseq
  if epoch and last then
    lms, lseq = parse_id(last)
  end
  local ms, seq
  if not lms then
    -- No epoch or no last id (a flush, an eviction, a first start): a new
    -- epoch, so that no id issued before can be taken for one issued now.
    epoch = new_epoch(us)
    redis.call('SET', EPOCH_KEY, epoch)
    ms, seq = now, 0
  elseif now > lms then
    ms, seq = now, 0
  else
    ms, seq = lms, lseq + 1
  end
  local id = fmt_num(ms) .. '-' .. fmt_num(seq)
  redis.call('SET', LAST_KEY, id)
  for _, key in ipairs(streams) do
    record(key, id, ms, notice, now)
  end
  local client_id = epoch .. ':' .. id
  -- The reply is the id alone (SPEC: "the reply is the notice's id");
  -- history.rs gets the receivers from PUBSUB NUMSUB in the same round trip.
  redis.call('PUBLISH', CHANNEL, '{"id":"' .. client_id .. '","notice":' .. notice .. '}')
  return client_id
end

-- ------------------------------------------------------------- history

-- Entries of one stream after since, or nil when the stream cannot prove
-- that it still holds all of them.
local function read_stream(key, sms, sseq, since, limit, now)
  if redis.call('EXISTS', key) == 0 then
    -- A notice after since would have kept the stream alive until at
    -- least (its id's ms + TTL): none can have expired if since is newer
    -- than now - TTL.
    if sms > now - TTL_MS then
      return {}
    end
    return nil
  end
  local info = redis.call('XINFO', 'STREAM', key)
  local dms, dseq
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then
      dms, dseq = parse_id(info[i + 1])
    end
  end
  if not dms or id_less(sms, sseq, dms, dseq) then
    return nil
  end
  local got = redis.call('XRANGE', key, '(' .. since, '+', 'COUNT', limit + 1)
  if #got > limit then
    return nil
  end
  return got
end

local function history(keys, args)
  local limit = tonumber(args[3] or '')
  local max_bytes = tonumber(args[4] or '0')
  if #keys ~= 0 or #args < 3 or #args > 4 or not limit or limit < 1 or limit > MAX_LIMIT
    or limit % 1 ~= 0 or not max_bytes or max_bytes < 0 then
    return redis.error_reply('ERR usage: FCALL_RO ' .. PREFIX .. '_history 0 <userId> <since> <limit 1..'
      .. MAX_LIMIT .. '> [<max notice bytes, 0 = no limit>]')
  end
  local user, since = args[1], args[2]
  local epoch = redis.call('GET', EPOCH_KEY)
  local last = redis.call('GET', LAST_KEY)
  local lms, lseq
  if epoch and last then
    lms, lseq = parse_id(last)
  end
  if not lms then
    return { 'missed', '' }
  end
  local last_client = epoch .. ':' .. last
  local se, sm, sq = string.match(since, '^([0-9a-z]+):(%d+)%-(%d+)$')
  -- 15 digits: beyond any ms or seq this library assigns, and exact in a
  -- Lua number.
  if se ~= epoch or #sm > 15 or #sq > 15 then
    return { 'missed', last_client }
  end
  local sms, sseq = tonumber(sm), tonumber(sq)
  if id_less(lms, lseq, sms, sseq) then
    return { 'missed', last_client } -- an id this Redis never issued (lost data)
  end
  local now = now_ms()
  local s = sm .. '-' .. sq
  local a = read_stream(USER_KEY .. user, sms, sseq, s, limit, now)
  local b = a and read_stream(BROADCAST_KEY, sms, sseq, s, limit, now)
  if not b or #a + #b > limit then
    return { 'missed', last_client }
  end
  if max_bytes > 0 then
    -- A replay the client's queue could not hold is no recovery either.
    local total = 0
    for _, list in ipairs({ a, b }) do
      for _, e in ipairs(list) do
        total = total + #e[2][2]
      end
    end
    if total > max_bytes then
      return { 'missed', last_client }
    end
  end
  local out = { 'ok', last_client }
  local i, j = 1, 1
  while i <= #a or j <= #b do
    local e
    if j > #b then
      e, i = a[i], i + 1
    elseif i > #a then
      e, j = b[j], j + 1
    else
      local ams, aseq = parse_id(a[i][1])
      local bms, bseq = parse_id(b[j][1])
      if id_less(ams, aseq, bms, bseq) then
        e, i = a[i], i + 1
      else
        e, j = b[j], j + 1
      end
    end
    out[#out + 1] = epoch .. ':' .. e[1]
    out[#out + 1] = e[2][2]
  end
  return out
end

-- ------------------------------------------------------------ presence
--
-- Each node writes the *absolute* number of connections each of its users
-- holds on it (never a delta), so a batch sent twice, or a rewrite racing
-- a reaper, cannot count anything twice. Layout:
--   presence:node:<node>  hash userId -> count     (what that node holds)
--   presence:user:<user>  hash node -> count       (the O(1) per-user read)
--   presence:nodes        zset node -> deadline ms (heartbeat: now + ttl)
--   presence:conns        hash node -> connections of that node
--   presence:stats        hash users -> users with a count anywhere
--   presence:leaving      zset userId -> when its offline event is due
--   presence:fresh        string, for a while after presence data was lost
-- Invariant: presence:node:<n> holds exactly what is counted for n in the
-- others, after every call, including a reap cut short by its budget.
-- Reads count only nodes whose deadline has not passed, so a dead node
-- drops out of every per-user answer at once; the next call of any
-- surviving node then reaps it (subtracts what it held, in budgeted steps).

local P_NODES = PREFIX .. ':presence:nodes'
local P_CONNS = PREFIX .. ':presence:conns'
local P_STATS = PREFIX .. ':presence:stats'
local P_LEAVING = PREFIX .. ':presence:leaving'
local P_FRESH = PREFIX .. ':presence:fresh'
local P_NODE = PREFIX .. ':presence:node:'
local P_USER = PREFIX .. ':presence:user:'
-- Fields of dead nodes reaped per call, and offline events per call: a
-- call stays short (Redis runs nothing else meanwhile); `more` says a
-- node should call again at once.
local REAP_BUDGET = 2000
local OFFLINE_BUDGET = 500

-- The same escaping as serde_json, so that the admin answer and this one
-- are the same bytes.
local function json_str(s)
  local out = string.gsub(s, '[%z\1-\31"\\]', function(c)
    if c == '"' then
      return '\\"'
    elseif c == '\\' then
      return '\\\\'
    elseif c == '\n' then
      return '\\n'
    elseif c == '\r' then
      return '\\r'
    elseif c == '\t' then
      return '\\t'
    elseif c == '\b' then
      return '\\b'
    elseif c == '\f' then
      return '\\f'
    end
    return string.format('\\u%04x', string.byte(c))
  end)
  return '"' .. out .. '"'
end

local function event(channel, what, user)
  redis.call('PUBLISH', channel, '{"event":"' .. what .. '","userId":' .. json_str(user) .. '}')
end

-- Sets node's count of user to count (>= 0) and keeps the aggregates.
-- Returns 1 when the user came online for the fleet, -1 when it went to
-- no connection anywhere, else 0.
local function set_count(node, user, count, old)
  if count == old then
    return 0
  end
  local uk = P_USER .. user
  local before = redis.call('EXISTS', uk)
  if count > 0 then
    redis.call('HSET', P_NODE .. node, user, count)
    redis.call('HSET', uk, node, count)
  else
    redis.call('HDEL', P_NODE .. node, user)
    redis.call('HDEL', uk, node)
  end
  if redis.call('HINCRBY', P_CONNS, node, count - old) <= 0 then
    redis.call('HDEL', P_CONNS, node)
  end
  local after = redis.call('EXISTS', uk)
  if before == 0 and after == 1 then
    redis.call('HINCRBY', P_STATS, 'users', 1)
    return 1
  elseif before == 1 and after == 0 then
    redis.call('HINCRBY', P_STATS, 'users', -1)
    return -1
  end
  return 0
end

local function presence_update(keys, args)
  local node, ttl, grace, channel, mode = args[1], tonumber(args[2] or ''), tonumber(args[3] or ''), args[4], args[5]
  if #keys ~= 0 or #args < 5 or #args % 2 ~= 1 or node == '' or not ttl or ttl < 1 or not grace or grace < 0
    or (mode ~= 'delta' and mode ~= 'rewrite' and mode ~= 'leave') then
    return redis.error_reply('ERR usage: FCALL ' .. PREFIX .. '_presence_update 0 <node> <ttl_ms> <grace_ms> '
      .. '<events channel or ""> <delta|rewrite|leave> [<userId> <count>]...')
  end
  local now = now_ms()
  if redis.call('EXISTS', P_NODES) == 0 then
    -- No node's presence at all: a first start, or Redis lost its data.
    -- Every node is about to rewrite what it holds: those users were
    -- online before, so the rewrites announce nobody for a while.
    redis.call('SET', P_FRESH, '1', 'PX', fmt_num(math.max(3 * ttl, 10000)))
  end
  local quiet = mode == 'rewrite' and redis.call('EXISTS', P_FRESH) == 1
  local deadline = tonumber(redis.call('ZSCORE', P_NODES, node) or '0')
  local live = deadline >= now and 1 or 0
  if mode == 'leave' then
    -- Dead from now on: what it still holds is reaped like any dead
    -- node's (below, when this call sent its zeros first).
    redis.call('ZADD', P_NODES, fmt_num(now - 1), node)
  else
    redis.call('ZADD', P_NODES, fmt_num(now + ttl), node)
  end
  local online, offline, more = 0, 0, 0
  local function went(user, t)
    if t == 1 then
      -- Back inside the grace: no offline, and no second online.
      if redis.call('ZREM', P_LEAVING, user) == 0 and channel ~= '' and not quiet then
        event(channel, 'online', user)
        online = online + 1
      end
    elseif t == -1 and channel ~= '' then
      redis.call('ZADD', P_LEAVING, fmt_num(now + grace), user)
    end
  end
  for i = 6, #args, 2 do
    local user, count = args[i], tonumber(args[i + 1])
    if user == '' or #user > MAX_USER_ID_LEN or not count or count < 0 or count % 1 ~= 0 then
      return redis.error_reply('ERR bad presence pair at argument ' .. i)
    end
    local old = tonumber(redis.call('HGET', P_NODE .. node, user) or '0')
    went(user, set_count(node, user, count, old))
  end
  -- Reap the dead, within the budget.
  local budget = REAP_BUDGET
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', P_NODES, '-inf', '(' .. fmt_num(now), 'LIMIT', 0, 8)) do
    if budget <= 0 then
      more = 1
      break
    end
    local nk = P_NODE .. dead
    while budget > 0 do
      local page = redis.call('HSCAN', nk, 0, 'COUNT', budget)[2]
      if #page == 0 then
        break
      end
      for j = 1, #page, 2 do
        went(page[j], set_count(dead, page[j], 0, tonumber(page[j + 1])))
      end
      budget = budget - #page / 2
    end
    if redis.call('EXISTS', nk) == 0 then
      redis.call('ZREM', P_NODES, dead)
      redis.call('HDEL', P_CONNS, dead)
    else
      more = 1
    end
  end
  if channel ~= '' then
    local due = redis.call('ZRANGEBYSCORE', P_LEAVING, '-inf', fmt_num(now), 'LIMIT', 0, OFFLINE_BUDGET)
    for _, user in ipairs(due) do
      -- ZREM answers 1 to exactly one caller: the event goes out once.
      if redis.call('ZREM', P_LEAVING, user) == 1 and redis.call('EXISTS', P_USER .. user) == 0 then
        event(channel, 'offline', user)
        offline = offline + 1
      end
    end
    if #due == OFFLINE_BUDGET then
      more = 1
    end
  end
  return { live, online, offline, more }
end

local function presence(keys, args)
  if #keys ~= 0 or #args > 1 then
    return redis.error_reply('ERR usage: FCALL_RO ' .. PREFIX .. '_presence 0 [<userId>]')
  end
  local now = now_ms()
  if #args == 1 then
    local user = args[1]
    if #user < 1 or #user > MAX_USER_ID_LEN then
      return redis.error_reply('ERR a user id is 1 to ' .. MAX_USER_ID_LEN .. ' bytes')
    end
    local h = redis.call('HGETALL', P_USER .. user)
    local conns, nodes = 0, 0
    for i = 1, #h, 2 do
      local d = redis.call('ZSCORE', P_NODES, h[i])
      if d and tonumber(d) >= now then
        conns = conns + tonumber(h[i + 1])
        nodes = nodes + 1
      end
    end
    return '{"userId":' .. json_str(user) .. ',"connections":' .. fmt_num(conns) .. ',"nodes":' .. fmt_num(nodes) .. '}'
  end
  local live = redis.call('ZRANGEBYSCORE', P_NODES, fmt_num(now), '+inf')
  local conns = 0
  if #live > 0 then
    for _, c in ipairs(redis.call('HMGET', P_CONNS, unpack(live))) do
      conns = conns + (tonumber(c) or 0)
    end
  end
  local users = 0
  if #live > 0 then
    -- Exact once the dead are reaped (a surviving node's next call).
    users = math.max(0, tonumber(redis.call('HGET', P_STATS, 'users') or '0'))
  end
  return '{"users":' .. fmt_num(users) .. ',"connections":' .. fmt_num(conns) .. ',"nodes":' .. fmt_num(#live) .. '}'
end

redis.register_function { function_name = PREFIX .. '_publish', callback = publish }
redis.register_function {
  function_name = PREFIX .. '_history',
  callback = history,
  flags = { 'no-writes' },
}
redis.register_function {
  function_name = PREFIX .. '_version',
  callback = function()
    return VERSION
  end,
  flags = { 'no-writes' },
}
redis.register_function { function_name = PREFIX .. '_presence_update', callback = presence_update }
redis.register_function {
  function_name = PREFIX .. '_presence',
  callback = presence,
  flags = { 'no-writes' },
}
