-- quotaflow, Redis state mode: decide one request against all its limits,
-- atomically (docs/redis-mode.md).
--
-- KEYS[i]: the state key of limit i.
-- ARGV[1]: now in ms; "0" = Redis's own clock (TIME), as in production.
-- ARGV[2]: the request's cost.
-- ARGV[3 + 5(i-1) ..]: limit i's algorithm (1 token bucket, 2 fixed window,
--   3 sliding window), its three parameters, and "1" if enforced.
--
-- Each function mirrors the Rust algorithm of the same name
-- (crates/quotaflow-core/src/algorithms) in integers held by doubles; the
-- settings refuse parameters whose arithmetic could pass 2^53, and a
-- property test against real Redis holds both to the same verdicts.
--
-- A key's value is "a b c refused": three state words and the count of
-- consecutive refusals. Token bucket state is "last_ms ahead_ns 0", the TAT
-- relative to the key's clock (an absolute TAT in ns would not fit a double).
--
-- Returns { admitted, then per limit: allowed, limit, remaining, reset_ms,
-- retry_after_ms, clock_ms, refused_before }.

local NS = 1000000
local GRACE_MS = 1000

-- floor(a / b) for non-negative integers, exact below 2^53.
local function fdiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function cdiv(a, b)
  return fdiv(a + b - 1, b)
end

local function fmt(x)
  return string.format('%.0f', x)
end

local function token_bucket(cap, interval, burst, s, now, cost)
  local last, ahead = s[1], s[2]
  if now < last then now = last end
  local rel = 0
  if now - last < cdiv(ahead, NS) then rel = ahead - (now - last) * NS end
  local allowed, new = false, 0
  if cost <= cap then
    new = rel + cost * interval
    allowed = new <= burst
  end
  local kept = rel
  if allowed then kept = new end
  local reset = cdiv(kept, NS)
  local retry = 0
  if not allowed then
    if cost > cap then
      retry = math.max(reset, 1)
    else
      retry = math.max(cdiv(new - burst, NS), 1)
    end
  end
  local remaining = 0
  if burst > kept then remaining = fdiv(burst - kept, interval) end
  return allowed, cap, remaining, reset, retry, now, { now, kept, 0 }, now + reset
end

local function fixed_window(limit, w, s, now, cost)
  if now < s[1] then now = s[1] end
  local start = now - math.fmod(now, w)
  local count = 0
  if start == s[1] then count = s[2] end
  local allowed = count + cost <= limit
  if allowed then count = count + cost end
  local stop = start + w
  local retry = 0
  if not allowed then retry = stop - now end
  return allowed, limit, math.max(limit - count, 0), stop - now, retry, now, { start, count, 0 }, stop
end

local function weighted(prev, curr, e, w)
  return prev * (w - e) + curr * w
end

-- ms after `e` until prev's weight has decayed enough for curr + cost to
-- fit, or nil if it never fits in this window.
local function wait_in_window(limit, w, prev, curr, cost, e)
  local need = curr + cost
  if need > limit then return nil end
  if prev == 0 then return 0 end
  local slack = (limit - need) * w
  local min_e = 0
  if prev * w > slack then min_e = w - fdiv(slack, prev) end
  if min_e < e then min_e = e end
  if min_e < w then return min_e - e end
  return nil
end

local function sliding_window(limit, w, s, now, cost)
  if now < s[1] then now = s[1] end
  local start = now - math.fmod(now, w)
  local curr, prev = 0, 0
  if start == s[1] then
    curr, prev = s[2], s[3]
  elseif s[1] + w == start then
    prev = s[2]
  end
  local e = now - start
  local allowed = cost <= limit and weighted(prev, curr + cost, e, w) <= limit * w
  if allowed then curr = curr + cost end
  local used = cdiv(weighted(prev, curr, e, w), w)
  local to_next = start + w - now
  local retry = 0
  if not allowed then
    local wait = wait_in_window(limit, w, prev, curr, cost, e)
    if wait then
      retry = math.max(wait, 1)
    else
      wait = wait_in_window(limit, w, curr, 0, cost, 0)
      if wait then retry = to_next + wait else retry = to_next + w end
    end
  end
  local reset = to_next
  if curr > 0 then reset = to_next + w end
  return allowed, limit, math.max(limit - used, 0), reset, retry, now, { start, curr, prev }, start + 2 * w
end

local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cost = tonumber(ARGV[2])

local seen = {}
local admitted = true
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 5
  local code = tonumber(ARGV[b + 1])
  local p1, p2, p3 = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local s, refused, found = { 0, 0, 0 }, 0, false
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local x, y, z, r = string.match(raw, '^(%d+) (%d+) (%d+) (%d+)$')
    if x then
      s = { tonumber(x), tonumber(y), tonumber(z) }
      refused = tonumber(r)
      found = true
    end
  end
  local o = {}
  if code == 1 then
    o.allowed, o.limit, o.remaining, o.reset, o.retry, o.clock, o.state, o.expires =
      token_bucket(p1, p2, p3, s, now, cost)
  elseif code == 2 then
    o.allowed, o.limit, o.remaining, o.reset, o.retry, o.clock, o.state, o.expires =
      fixed_window(p1, p2, s, now, cost)
  else
    o.allowed, o.limit, o.remaining, o.reset, o.retry, o.clock, o.state, o.expires =
      sliding_window(p1, p2, s, now, cost)
  end
  o.found, o.refused = found, refused
  if not o.allowed and ARGV[b + 5] == '1' then admitted = false end
  seen[i] = o
end

local out = { admitted and 1 or 0 }
for i = 1, #KEYS do
  local o = seen[i]
  local st = o.state
  local text = fmt(st[1]) .. ' ' .. fmt(st[2]) .. ' ' .. fmt(st[3])
  if admitted and o.allowed then
    -- Consumed: the new state lives until it is a fresh key's again, and
    -- one second more, so a late request (a gateway's clock behind) is
    -- still applied at the key's clock, as the in-memory store does until
    -- its sweeper passes.
    local ttl = math.max(o.expires - now, 0) + GRACE_MS
    redis.call('SET', KEYS[i], text .. ' 0', 'PX', fmt(ttl))
  elseif not o.allowed and o.found then
    -- Refused: only the key's clock and its refusal count move.
    redis.call('SET', KEYS[i], text .. ' ' .. fmt(o.refused + 1), 'KEEPTTL')
  end
  local n = #out
  out[n + 1] = o.allowed and 1 or 0
  out[n + 2] = o.limit
  out[n + 3] = o.remaining
  out[n + 4] = o.reset
  out[n + 5] = o.retry
  out[n + 6] = o.clock
  out[n + 7] = o.refused
end
return out
