"""Redis key layout and the Lua scripts that write it. Everything else talks to Redis through these names.

A namespace's keys are split into slot groups (``groups``): each group's keys share a prefix
``memrec:{tag}:`` whose braces are a Redis Cluster hash tag, so each group lives in one slot. With one
group (a single Redis) the prefix is ``memrec:{ns}:``. The table below is one group's; a user's keys are
all in their group, the catalogue, epoch, group count and holder keys in group 0, and every group has its
own ``log``, ``interactions``, ``mem:seq``, ``mem:count`` and ``mem:low``. Memory ids are
``seq * G + g`` (G groups, g the group, seq the group's ``mem:seq``): plain 1, 2, 3, ... with one group.

Every script starts with a ``#!lua`` shebang and takes its group's ``log`` key as KEYS[1]: the key routes
the call to the master of the group's slot, and with the shebang Redis refuses any key the script touches
in another slot (the other keys are named from the prefix in ARGV[1]; all carry the group's tag).

=======================  ======  ==================================================================
key (after the prefix)   type    content
=======================  ======  ==================================================================
``hist:{user}``          LIST    recent item ids of the user, oldest first, trimmed to history_len
``state:{user}``         STRING  the user's encoder state (``memory_store.states``): the fingerprint
                                 (40 bytes, sha1 hex) of the history window it encodes (the last
                                 state_window items), then dim float32 LE; kept only while that window
                                 is the history's last items (every append without a new one drops it)
``mem:{id}``             HASH    one memory: v (dim float32 LE bytes), item, user, ts, len, rec
                                 (the prefix's last items, recent_width int64 LE, most recent first)
``mem:seq``              STRING  last memory id allocated (INCRBY inside the write script)
``mem:count``            STRING  memories currently held
``mem:low``              STRING  eviction cursor: no memory below this id is held
``byuser:{user}``        LIST    memory ids of the user, oldest first (the per-user capacity's order,
                                 and what an erasure removes; memories written before it was kept
                                 for every capacity are found by the replica's index instead)
``seen:{event_id}``      STRING  dedup marker, SET NX with the dedup TTL
``events:{user}``        SET     the user's event ids with a dedup marker (for erasure), expiring
                                 with the latest of them
``umem:{user}``          HASH    per-user memories: item id -> packed record (user_memory.record_dtype)
``unavailable``          SET     item ids marked unavailable
``items:new``            HASH    external id -> internal id of the items registered after training
``items:seq``            STRING  last internal id given to a new item (starts at first_new_item - 1)
``bank:loaded``          STRING  set once the start-up bulk load of the memory bank completed
``log``                  STREAM  replication log, one entry per write (see below)
``log:seq``              STRING  the number of the group's last log entry: each entry carries the next
                                 (``seq``), so a replica sees entries that went missing
``interactions``         STREAM  the interaction log: one entry per accepted interaction, fields u (user),
                                 i (item id), t (its timestamp), e (event id, '' for none); entry ids
                                 are the time Redis accepted it, so each write trims the rows past the
                                 retention with ``MINID`` (exact, O(rows dropped)). A stream of its own:
                                 the replication log's trim (``stream_maxlen``) never reaches it and
                                 replicas never read it. Only ``memrec export`` reads it (XRANGE pages).
``interactions:{user}``  LIST    the user's entry ids in ``interactions``, oldest first: what an erasure
                                 deletes (XDEL) without scanning the log; trimmed with the log on the
                                 user's writes and expiring when all of them are past the retention
``epoch``                STRING  random token set once (SET NX) when a replica first opens the
                                 namespace; a snapshot records it, so one taken before the namespace
                                 was emptied (FLUSHDB, a restart without persistence) is never restored
``groups``               STRING  the namespace's slot groups (``groups``), set when it is first opened
``holder:{id}``          STRING  present while a process has the namespace open (each open store sets
                                 its own every HOLD_S / 3 seconds, expiring after HOLD_S): ``drop``
                                 deletes the namespace only when no other process holds it
=======================  ======  ==================================================================

Log entries (all binary little-endian), each with ``seq``, its number in the group's log (1, 2, 3, ...;
absent in entries written before it existed). A replica that reads a number other than the next one has
missed entries or applied some that are gone (writes lost in a failover: the promoted replica counts on
from where it stood) and rebuilds its index from the hashes:

* ``op=add id0 n vec item ts len rec user [step]``: memories ``id0, id0 + step, ...`` (n of them; ``step``
  is G, absent with one group); ``vec`` (n, dim) float32,
  ``item`` (n,) int64, ``ts`` (n,) float64, ``len`` (n,) int32, ``rec`` (n, w) int64, ``user`` a
  JSON list of n strings. The width w is the writer's ``recent_width`` (``len(rec) / (8 n)``; a reader
  fits it to its own). Entries and hashes written before ``rec`` existed lack it (no items known).
* ``op=del ids``: comma-separated memory ids removed (explicitly, by eviction, by age or by a user's
  erasure).
* ``op=avail on items``: comma-separated item ids whose availability changed to ``on`` ("1"
  available again, "0" unavailable).
* ``op=items names ids``: new items registered, ``names`` a JSON list of external ids and ``ids``
  their comma-separated internal ids.

Replicas read the whole catalogue (``unavailable``, ``items:new``) when they restore or rebuild, then
apply the ``avail`` and ``items`` entries after that position as they apply memories. Each entry sets
a state (never toggles one), so replaying an entry the read already reflected changes nothing.

One write script call is one atomic unit: dedup markers, history appends, the users' encoder states,
interaction log rows, memory hashes, the log entry and the evictions it causes commit together or not at
all. An erased user's log rows go with XDEL, which frees their memory once every entry of their stream
node is deleted or trimmed; like every erased key they stay in an append-only file until its next rewrite.
"""

from __future__ import annotations


def key_prefix(namespace: str) -> str:
    return f"memrec:{{{namespace}}}:"


HIST = "hist:"
STATE = "state:"
MEM = "mem:"
MEM_SEQ = "mem:seq"
MEM_COUNT = "mem:count"
MEM_LOW = "mem:low"
BY_USER = "byuser:"
SEEN = "seen:"
USER_MEM = "umem:"
USER_EVENTS = "events:"
UNAVAILABLE = "unavailable"
NEW_ITEMS = "items:new"
NEW_ITEMS_SEQ = "items:seq"
BANK_LOADED = "bank:loaded"
LOG = "log"
INTERACTIONS = "interactions"
USER_INTERACTIONS = "interactions:"
EPOCH = "epoch"
GROUPS = "groups"
HOLDER = "holder:"
HOLD_S = 30  # a holder key outlives its process by at most this

# Every script's first lines: the shebang (Redis then refuses keys outside the declared key's slot) and
# log_add, the one way an entry goes into the group's replication log: numbered (``log:seq``), trimmed.
_PRELUDE = """#!lua
local function log_add(p, maxlen, ...)
  local seq = redis.call('INCR', p .. 'log:seq')
  return redis.call('XADD', p .. 'log', 'MAXLEN', '~', maxlen, '*', 'seq', seq, ...)
end
"""


def _script(body: str) -> str:
    return _PRELUDE + body


# Fields of one memory hash.
MEM_FIELDS = (b"v", b"item", b"user", b"ts", b"len", b"rec")

# KEYS: the group's log. ARGV: prefix, n, vector stride, dedup ttl, history_len, capacity (the group's
# share; 0: none), user capacity (0: none), stream maxlen, mode ('i' history, 'm' memory, 'im' both; with
# 'l' the accepted interactions are logged), the packed vec/item/ts/len/rec blobs, the state window (0: no
# states), the number of states s, their packed values (``STATE`` values, s of them) and the stride of
# one, the interaction log's retention in ms (0: for ever), the groups G and this group g (21 so far),
# then per record: event id ('' for none), user, item, ts, prefix length; then the s users of the
# states. Every user is of group g. Returns {add id, del id, first memory id (the next are G apart),
# accepted record indices (1-based)}.
WRITE_SCRIPT = _script("""
local p = ARGV[1]
local n, stride, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hlen, cap, ucap, maxlen = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local mode = ARGV[9]
local vecs, items, tss, lens, recs = ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local swin, ns, sblobs, sstride = tonumber(ARGV[15]), tonumber(ARGV[16]), ARGV[17], tonumber(ARGV[18])
local keep = tonumber(ARGV[19])
local G, g = tonumber(ARGV[20]), tonumber(ARGV[21])
local H, W = 21, 5
local rstride = string.len(recs) / n
local with_hist = string.find(mode, 'i', 1, true) ~= nil
local with_mem = string.find(mode, 'm', 1, true) ~= nil
local with_log = string.find(mode, 'l', 1, true) ~= nil

-- 1. dedup: an event id is accepted once per TTL (also within this batch); the user's set of event
-- ids names the markers an erasure removes
local acc = {}
for i = 1, n do
  local ev = ARGV[H + (i - 1) * W + 1]
  if ev == '' then
    acc[#acc + 1] = i
  elseif redis.call('SET', p .. 'seen:' .. ev, '1', 'NX', 'EX', ttl) then
    acc[#acc + 1] = i
    local ek = p .. 'events:' .. ARGV[H + (i - 1) * W + 2]
    redis.call('SADD', ek, ev)
    redis.call('EXPIRE', ek, ttl)
  end
end
local m = #acc
if m == 0 then return {'', '', 0, acc} end

-- 2. histories
if with_hist then
  for _, i in ipairs(acc) do
    local b = H + (i - 1) * W
    local hk = p .. 'hist:' .. ARGV[b + 2]
    redis.call('RPUSH', hk, ARGV[b + 3])
    redis.call('LTRIM', hk, -hlen, -1)
  end
end

-- 2b. encoder states: a given one is kept where its window is the history's last items now (a
-- concurrent write or a duplicate event of the batch leaves it unkept); every other state of a user
-- appended to is dropped, so a kept state always encodes its history's last items
if with_hist and swin > 0 then
  local done = {}
  for s = 1, ns do
    local user = ARGV[H + n * W + s]
    local blob = string.sub(sblobs, (s - 1) * sstride + 1, s * sstride)
    local window = redis.call('LRANGE', p .. 'hist:' .. user, -swin, -1)
    if redis.sha1hex(table.concat(window, ',')) == string.sub(blob, 1, 40) then
      redis.call('SET', p .. 'state:' .. user, blob)
    else
      redis.call('DEL', p .. 'state:' .. user)
    end
    done[user] = true
  end
  for _, i in ipairs(acc) do
    local user = ARGV[H + (i - 1) * W + 2]
    if not done[user] then
      redis.call('DEL', p .. 'state:' .. user)
      done[user] = true
    end
  end
end
-- 2c. the interaction log: one entry per accepted interaction, the rows past the retention trimmed
-- (MINID) as each is added; the user's list of their entries is trimmed alike and expires when all of
-- them are past it
if with_log then
  local lk = p .. 'interactions'
  local head = {lk}
  local oldest = 0
  if keep > 0 then
    local now = redis.call('TIME')
    oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - keep
    head = {lk, 'MINID', string.format('%.0f', oldest)}
  end
  for _, i in ipairs(acc) do
    local b = H + (i - 1) * W
    local user = ARGV[b + 2]
    local args = {unpack(head)}
    for _, v in ipairs({'*', 'u', user, 'i', ARGV[b + 3], 't', ARGV[b + 4], 'e', ARGV[b + 1]}) do
      args[#args + 1] = v
    end
    local uk = p .. 'interactions:' .. user
    redis.call('RPUSH', uk, redis.call('XADD', unpack(args)))
    if keep > 0 then
      local first = redis.call('LINDEX', uk, 0)
      while first and tonumber(string.match(first, '^%d+')) < oldest do
        redis.call('LPOP', uk)
        first = redis.call('LINDEX', uk, 0)
      end
      redis.call('PEXPIRE', uk, keep)
    end
  end
end
if not with_mem then return {'', '', 0, acc} end

-- 3. memories: contiguous ids, one hash each, one log entry for the batch
local last = redis.call('INCRBY', p .. 'mem:seq', m)
local first = last - m + 1
local users, v, it, t, l, r = {}, {}, {}, {}, {}, {}
for j, i in ipairs(acc) do
  local b = H + (i - 1) * W
  local id = (first + j - 1) * G + g
  local vec = string.sub(vecs, (i - 1) * stride + 1, i * stride)
  local rec = string.sub(recs, (i - 1) * rstride + 1, i * rstride)
  redis.call('HSET', p .. 'mem:' .. id, 'v', vec, 'item', ARGV[b + 3], 'user', ARGV[b + 2],
             'ts', ARGV[b + 4], 'len', ARGV[b + 5], 'rec', rec)
  users[j] = ARGV[b + 2]
  redis.call('RPUSH', p .. 'byuser:' .. users[j], id)
  if m < n then
    v[j] = vec
    it[j] = string.sub(items, (i - 1) * 8 + 1, i * 8)
    t[j] = string.sub(tss, (i - 1) * 8 + 1, i * 8)
    l[j] = string.sub(lens, (i - 1) * 4 + 1, i * 4)
    r[j] = rec
  end
end
if m < n then
  vecs, items, tss, lens = table.concat(v), table.concat(it), table.concat(t), table.concat(l)
  recs = table.concat(r)
end
local count = redis.call('INCRBY', p .. 'mem:count', m)
local entry = {'op', 'add', 'id0', first * G + g, 'n', m, 'vec', vecs, 'item', items, 'ts', tss,
               'len', lens, 'rec', recs, 'user', cjson.encode(users)}
if G > 1 then entry[#entry + 1] = 'step'; entry[#entry + 1] = G end
local add_id = log_add(p, maxlen, unpack(entry))

-- 4. evictions: per-user capacity first, then the global capacity (oldest ids first)
local evicted = {}
local function evict(id)
  local hk = p .. 'mem:' .. id
  local user = redis.call('HGET', hk, 'user')
  if not user then return false end
  redis.call('DEL', hk)
  redis.call('LREM', p .. 'byuser:' .. user, 1, id)
  evicted[#evicted + 1] = id
  return true
end
if ucap > 0 then
  local done = {}
  for _, u in ipairs(users) do
    if not done[u] then
      done[u] = true
      local lk = p .. 'byuser:' .. u
      for _ = 1, redis.call('LLEN', lk) - ucap do evict(redis.call('LPOP', lk)) end
    end
  end
end
count = count - #evicted
if cap > 0 and count > cap then
  local low = tonumber(redis.call('GET', p .. 'mem:low') or '1')
  while count > cap and low <= last do
    if evict(low * G + g) then count = count - 1 end
    low = low + 1
  end
  redis.call('SET', p .. 'mem:low', low)
end
local del_id = ''
if #evicted > 0 then
  redis.call('SET', p .. 'mem:count', count)
  del_id = log_add(p, maxlen, 'op', 'del',
                      'ids', table.concat(evicted, ','))
end
return {add_id, del_id, first * G + g, acc}
""")

# ARGV: prefix, items to read per history, user ids. Returns per user {their last items, oldest first;
# their packed state or ''}: a micro-batch's read in one call (a pipeline of two commands per user cost
# the client several times the CPU of one script call). Reads only; the caller checks each state's
# fingerprint against the items read.
READ_SCRIPT = _script("""
local p, n = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('LRANGE', p .. 'hist:' .. ARGV[i], -n, -1)
  out[#out + 1] = redis.call('GET', p .. 'state:' .. ARGV[i]) or ''
end
return out
""")

# ARGV: prefix, state window, stride of one packed state, the packed states, then their users. A state
# is kept only where its window is the user's history's last items (never for a user without history,
# e.g. one erased since it was encoded). Returns how many were kept.
PUT_STATES_SCRIPT = _script("""
local p, swin, stride, blobs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local kept = 0
for s = 5, #ARGV do
  local blob = string.sub(blobs, (s - 5) * stride + 1, (s - 4) * stride)
  local window = redis.call('LRANGE', p .. 'hist:' .. ARGV[s], -swin, -1)
  if #window > 0 and redis.sha1hex(table.concat(window, ',')) == string.sub(blob, 1, 40) then
    redis.call('SET', p .. 'state:' .. ARGV[s], blob)
    kept = kept + 1
  end
end
return kept
""")

# ARGV: prefix, stream maxlen, memory ids. Returns {'ok', log id} or {'missing', the first unknown id}.
REMOVE_SCRIPT = _script("""
local p, maxlen = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  if redis.call('EXISTS', p .. 'mem:' .. ARGV[i]) == 0 then return {'missing', ARGV[i]} end
end
for i = 3, #ARGV do
  local hk = p .. 'mem:' .. ARGV[i]
  local user = redis.call('HGET', hk, 'user')
  redis.call('DEL', hk)
  redis.call('LREM', p .. 'byuser:' .. user, 1, ARGV[i])
end
redis.call('DECRBY', p .. 'mem:count', #ARGV - 2)
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
return {'ok', log_add(p, maxlen, 'op', 'del',
                         'ids', table.concat(ids, ','))}
""")

# ARGV: prefix, stream maxlen, '1' (available again) or '0' (unavailable), item ids. Only the items
# whose state changes go into the log entry. Returns {changed count, log id or ''}.
AVAILABILITY_SCRIPT = _script("""
local p, maxlen, on = ARGV[1], ARGV[2], ARGV[3]
local key = p .. 'unavailable'
local changed = {}
for i = 4, #ARGV do
  local n
  if on == '1' then n = redis.call('SREM', key, ARGV[i]) else n = redis.call('SADD', key, ARGV[i]) end
  if n == 1 then changed[#changed + 1] = ARGV[i] end
end
if #changed == 0 then return {0, ''} end
return {#changed, log_add(p, maxlen, 'op', 'avail', 'on', on,
                             'items', table.concat(changed, ','))}
""")

# ARGV: prefix, stream maxlen, first_new_item, external ids. Unknown ids get the next internal ids
# (never below first_new_item), all in one atomic call, so replicas registering at once agree.
# Returns {log id or '', internal id per external id}.
REGISTER_SCRIPT = _script("""
local p, maxlen, first = ARGV[1], ARGV[2], tonumber(ARGV[3])
local hk, sk = p .. 'items:new', p .. 'items:seq'
local ids, names, fresh = {}, {}, {}
for i = 4, #ARGV do
  local id = redis.call('HGET', hk, ARGV[i])
  if not id then
    if tonumber(redis.call('GET', sk) or '0') < first - 1 then redis.call('SET', sk, first - 1) end
    id = redis.call('INCR', sk)
    redis.call('HSET', hk, ARGV[i], id)
    names[#names + 1] = ARGV[i]
    fresh[#fresh + 1] = id
  end
  ids[#ids + 1] = tonumber(id)
end
if #names == 0 then return {'', ids} end
return {log_add(p, maxlen, 'op', 'items',
                   'names', cjson.encode(names), 'ids', table.concat(fresh, ',')), ids}
""")

# ARGV: prefix, stream maxlen, the interaction log's retention in ms (0: for ever), user id, then memory
# ids the replica's index holds for the user (those written before ``byuser`` was kept for every
# capacity). Removes the history and its encoder state, every memory whose ``user`` is theirs (one
# ``del`` log entry, so every replica drops them and their transition counts), the per-user memories,
# the dedup markers, the interaction log rows (the log trimmed to the retention first: the rows the
# user's list no longer names are past it) and the lists that name them.
# Returns {history items, memories, per-user memories, dedup markers, log id or '', log rows}.
ERASE_SCRIPT = _script("""
local p, maxlen, keep, user = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local history = redis.call('LLEN', p .. 'hist:' .. user)
redis.call('DEL', p .. 'hist:' .. user, p .. 'state:' .. user)
local ids, looked = {}, {}
local function erase(id)
  if looked[id] then return end
  looked[id] = true
  local hk = p .. 'mem:' .. id
  if redis.call('HGET', hk, 'user') == user then
    redis.call('DEL', hk)
    ids[#ids + 1] = id
  end
end
for _, id in ipairs(redis.call('LRANGE', p .. 'byuser:' .. user, 0, -1)) do erase(id) end
for i = 5, #ARGV do erase(ARGV[i]) end
redis.call('DEL', p .. 'byuser:' .. user)
local markers = 0
for _, ev in ipairs(redis.call('SMEMBERS', p .. 'events:' .. user)) do
  markers = markers + redis.call('DEL', p .. 'seen:' .. ev)
end
redis.call('DEL', p .. 'events:' .. user)
local umem = redis.call('HLEN', p .. 'umem:' .. user)
redis.call('DEL', p .. 'umem:' .. user)
local lk, uk = p .. 'interactions', p .. 'interactions:' .. user
if keep > 0 then
  local now = redis.call('TIME')
  local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - keep
  redis.call('XTRIM', lk, 'MINID', string.format('%.0f', oldest))
end
local logged, entries = 0, redis.call('LRANGE', uk, 0, -1)
for s = 1, #entries, 1000 do  -- XDEL takes many ids; unpack has a limit
  logged = logged + redis.call('XDEL', lk, unpack(entries, s, math.min(s + 999, #entries)))
end
redis.call('DEL', uk)
if #ids == 0 then return {history, 0, umem, markers, '', logged} end
redis.call('DECRBY', p .. 'mem:count', #ids)
return {history, #ids, umem, markers, log_add(p, maxlen,
                                                 'op', 'del', 'ids', table.concat(ids, ',')), logged}
""")

# ARGV: prefix, stream maxlen, cutoff (unix seconds), memory ids found old by a replica's index. Removes
# each one still held whose timestamp is before the cutoff (checked here: replicas sweep concurrently,
# each from its own applied log), as REMOVE_SCRIPT does, in one ``del`` log entry (retention by age,
# memory_store.retention). Returns {memories removed, log id or ''}.
EXPIRE_SCRIPT = _script("""
local p, maxlen, cutoff = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = {}
for i = 4, #ARGV do
  local hk = p .. 'mem:' .. ARGV[i]
  local held = redis.call('HMGET', hk, 'user', 'ts')
  if held[1] and tonumber(held[2]) < cutoff then
    redis.call('DEL', hk)
    redis.call('LREM', p .. 'byuser:' .. held[1], 1, ARGV[i])
    ids[#ids + 1] = ARGV[i]
  end
end
if #ids == 0 then return {0, ''} end
redis.call('DECRBY', p .. 'mem:count', #ids)
return {#ids, log_add(p, maxlen, 'op', 'del',
                         'ids', table.concat(ids, ','))}
""")
