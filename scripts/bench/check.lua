-- wrk script for scripts/bench-http.sh: POST /check with bodies cycling
-- over BENCH_USERS ordinary users (default 10000), and 1 request in 20 from
-- one hot user: the same mix as scripts/bench/loadgen sends.
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
  local body = '{"user_id":"' .. user .. '","method":"GET","path":"/orders"}'
  return wrk.format("POST", "/check", headers, body)
end
