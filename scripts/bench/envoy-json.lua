-- wrk script for scripts/bench-redis.sh: envoyproxy/ratelimit's HTTP /json
-- endpoint with the same user mix as scripts/bench/check.lua sends to
-- quotaflow's POST /check (and scripts/bench/loadgen -body envoy): bodies
-- cycling over BENCH_USERS ordinary users (default 10000), and 1 request in
-- 20 from one hot user. Each body is a RateLimitRequest of domain "bench"
-- with one descriptor entry user_id = the user; the service answers 200
-- (OK) or 429 (OVER_LIMIT).
-- Each wrk thread starts at its own offset in the cycle.

local users = tonumber(os.getenv("BENCH_USERS") or "10000")
local next_id = 0

function setup(thread)
  thread:set("offset", next_id * 5000)
  next_id = next_id + 1
end

local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  counter = offset or 0
end

function request()
  counter = counter + 1
  local user
  if counter % 20 == 19 then
    user = "hot-user"
  else
    user = string.format("user-%05d", counter % users)
  end
  local body = '{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"'
    .. user .. '"}]}]}'
  return wrk.format("POST", "/json", headers, body)
end
