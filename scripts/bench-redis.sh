#!/usr/bin/env bash
# Side-by-side HTTP benchmark of quotaflow's Redis state mode against two
# baselines, in one run, on ONE private Redis, with the same load tools and
# the same key spread. Loopback only.
#
#   scripts/bench-redis.sh
#   SERVERS=envoy scripts/bench-redis.sh          # one server only
#
# The servers (SERVERS, in this order by default: "quotaflow quotaflow-eval envoy"):
#   A  quotaflow       quotaflow serve, Redis state mode, pipelined (the
#                      defaults: [redis] connections = 2, max_batch = 128)
#   B  quotaflow-eval  the same with QUOTAFLOW__REDIS__MAX_BATCH=1 and
#                      QUOTAFLOW__REDIS__CONNECTIONS=$CONNECTIONS: one EVALSHA
#                      round trip per check, one Redis connection per load
#                      connection (the baseline without pipelining)
#   C  envoy           envoyproxy/ratelimit (go install'ed once by
#                      scripts/tools.sh), Redis backend, its
#                      HTTP /json endpoint
# with one limit, the same in meaning for both products: per user, a fixed
# window of 20 requests per second (scripts/bench/redis.toml; for envoy a
# rule of domain "bench", descriptor key user_id, unit: second,
# requests_per_unit: 20, written under $OUT/envoy-runtime/).
#
# Steps:
# 1. installs what is missing: wrk, jq, curl, redis-server (Debian), envoy
#    ratelimit (scripts/tools.sh: `go install
#    github.com/envoyproxy/ratelimit/src/service_cmd@$ENVOY_RATELIMIT_VERSION`,
#    skipped when the binary exists); builds scripts/bench/loadgen and, when
#    a quotaflow server is selected, `cargo build --release` (SKIP_BUILD=1:
#    use target/release/quotaflow as it is);
# 2. starts a private redis-server on 127.0.0.1:$REDIS_PORT (no persistence);
# 3. pass 1, for each server in turn: FLUSHALL, start it, a probe (45 quick
#    checks of one user: some must be refused), warm-up (wrk, 3 s), then
#    (a) maximum throughput: wrk -c$CONNECTIONS, keep-alive, DURATION s;
# 4. pass 2, for each server in turn: FLUSHALL, start it, warm-up (loadgen
#    at the fixed rate, 3 s), then
#    (b) fixed rate, open loop: loadgen at the SAME rate for every server
#    (RATE, or half the lowest maximum of (a)), DURATION s: p50/p99/max
#    from each request's due time, status codes;
#    (with RATE set, (b) follows (a) in pass 1 and there is no pass 2);
# 5. stops everything it started by pid (also on error or Ctrl-C) and writes
#    $OUT/summary.md (also printed): per server, requests/s, latencies,
#    status codes, and CPU per request of the server and of Redis (from
#    /proc/PID/stat over each phase).
#
# Load: bodies cycle over BENCH_USERS ordinary users (a few checks per
# second each: always allowed) plus one hot user on 1 request in 20 (all but
# 20 a second refused with 429): scripts/bench/check.lua and
# scripts/bench/envoy-json.lua for wrk, scripts/bench/loadgen -body
# quotaflow|envoy for the fixed rate.
#
# Environment (all optional):
#   SERVERS="quotaflow quotaflow-eval envoy"
#   DURATION=10  CONNECTIONS=32  WRK_THREADS=1  BENCH_USERS=10000
#   RATE=<req/s>      fixed rate for (b) instead of half the lowest max of (a)
#   PORT=18182        quotaflow's HTTP port (A and B, one after the other)
#   ENVOY_PORT=18190  envoy ratelimit's HTTP port; its gRPC and debug ports
#                     are ENVOY_PORT+1 and ENVOY_PORT+2
#   REDIS_PORT=16390  the private redis-server
#   ENVOY_EXTRA_ENV="NAME=VALUE ..."  more envoy ratelimit settings, e.g.
#                     REDIS_POOL_SIZE=32 (its default is 10)
#   QUOTAFLOW_EXTRA_ENV="QUOTAFLOW__SECTION__KEY=VALUE ..."  more settings for
#                     both quotaflow servers (A and B), e.g.
#                     QUOTAFLOW__REDIS__DENY_CACHE=false
#   NICE=0            nice level of the servers, Redis and the load tools
#   SKIP_BUILD=0      1: no cargo build
#   ENVOY_RATELIMIT_VERSION=<pinned in scripts/tools.sh>   module version to build
#   QUOTAFLOW_CACHE=~/.cache/quotaflow
# Results and logs: target/bench-redis/ (under CARGO_TARGET_DIR when set).
#
# Not alike by default: quotaflow's [redis] deny_cache (on) answers a key
# Redis refused locally until its window ends; envoy ratelimit's counterpart,
# LOCAL_CACHE_SIZE_IN_BYTES, is 0 (off) by default. The summary says so; set
# one of the two above to compare like with like.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

SERVERS="${SERVERS:-quotaflow quotaflow-eval envoy}"
PORT="${PORT:-18182}"
ENVOY_PORT="${ENVOY_PORT:-18190}"
REDIS_PORT="${REDIS_PORT:-16390}"
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
WRK_THREADS="${WRK_THREADS:-1}"
NICE="${NICE:-0}"
BENCH_USERS="${BENCH_USERS:-10000}"
SKIP_BUILD="${SKIP_BUILD:-0}"
WARMUP=3
ENVOY_BIN=""
ENVOY_GRPC_PORT=$((ENVOY_PORT + 1))
ENVOY_DEBUG_PORT=$((ENVOY_PORT + 2))

CONFIG="scripts/bench/redis.toml"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="${ROOT}/${TARGET_DIR}" ;; esac
OUT="${TARGET_DIR}/bench-redis"
BIN="${TARGET_DIR}/release/quotaflow"
LOADGEN="${OUT}/loadgen"
export BENCH_USERS

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'bench-redis: WARNING: %s\n' "$*" >&2; }
die() {
  printf 'bench-redis: %s\n' "$*" >&2
  exit 1
}

case "$DURATION$PORT$ENVOY_PORT$REDIS_PORT$CONNECTIONS$WRK_THREADS$BENCH_USERS${RATE:-0}" in
  *[!0-9]*) die "PORT, ENVOY_PORT, REDIS_PORT, DURATION, CONNECTIONS, WRK_THREADS, BENCH_USERS and RATE must be integers" ;;
esac
case "$NICE" in
  -[0-9] | -1[0-9] | [0-9] | 1[0-9]) ;;
  *) die "NICE must be an integer between -19 and 19" ;;
esac
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 300 ]; then
  die "DURATION must be 1..300 seconds"
fi
if [ -n "${RATE:-}" ] && [ "$RATE" -lt 1 ]; then
  die "RATE must be at least 1"
fi
[ "$CONNECTIONS" -ge 1 ] || die "CONNECTIONS must be at least 1"
NEED_QUOTAFLOW=0
for kv in ${QUOTAFLOW_EXTRA_ENV:-}; do
  case "$kv" in
    QUOTAFLOW__[A-Z_]*=*) ;;
    *) die "QUOTAFLOW_EXTRA_ENV: '$kv' is not QUOTAFLOW__NAME=VALUE" ;;
  esac
done
for s in $SERVERS; do
  case "$s" in
    quotaflow | quotaflow-eval) NEED_QUOTAFLOW=1 ;;
    envoy) ;;
    *) die "unknown server '$s' in SERVERS (quotaflow, quotaflow-eval, envoy)" ;;
  esac
done
[ -n "${SERVERS// /}" ] || die "SERVERS is empty"

# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

label() {
  case "$1" in
    quotaflow) echo "A quotaflow redis (pipelined)" ;;
    quotaflow-eval) echo "B quotaflow redis (max_batch=1)" ;;
    envoy) echo "C envoy ratelimit" ;;
  esac
}

# ---------------------------------------------------------------- tools
command -v wrk >/dev/null || apt_install wrk
command -v jq >/dev/null || apt_install jq
command -v curl >/dev/null || apt_install curl
command -v redis-server >/dev/null || apt_install redis-server
command -v redis-cli >/dev/null || apt_install redis-tools
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  apt_install golang-go
fi
GO="$(command -v go || echo /usr/local/go/bin/go)"

mkdir -p "$OUT"
rm -rf "${OUT:?}"/*.txt "${OUT:?}"/*.json "${OUT:?}"/*.log "${OUT:?}"/*.stderr "${OUT:?}"/*.md "${OUT:?}/envoy-runtime" "${OUT:?}/redis"

ENVOY_VERSION="n/a"
case " $SERVERS " in
  *" envoy "*)
    envoy_env="$(scripts/tools.sh envoy-ratelimit)" || die "installing envoy ratelimit failed (scripts/tools.sh)"
    eval "$envoy_env"
    ENVOY_BIN="$ENVOY_RATELIMIT_BIN"
    say "envoy ratelimit: $ENVOY_BIN"
    ENVOY_VERSION="$("$GO" version -m "$ENVOY_BIN" 2>/dev/null |
      awk '$1 == "mod" && $2 == "github.com/envoyproxy/ratelimit" {print $3}')"
    ENVOY_VERSION="${ENVOY_VERSION:-unknown}"
    say "envoy ratelimit version: ${ENVOY_VERSION}"
    ;;
esac

if [ "$NEED_QUOTAFLOW" -eq 1 ]; then
  if [ "$SKIP_BUILD" = 1 ]; then
    say "SKIP_BUILD=1: using $BIN as it is"
  else
    say "cargo build --release"
    cargo build --release
  fi
  [ -x "$BIN" ] || die "$BIN was not built"
fi

say "go build scripts/bench/loadgen"
(cd scripts/bench/loadgen && GOTOOLCHAIN=local "$GO" build -o "$LOADGEN" .)

# ---------------------------------------------------------------- processes
SERVER_PID=""
REDIS_PID=""
stop_pid() { # pid: TERM, up to 5 s, then KILL
  local pid="$1"
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
stop_server() {
  stop_pid "$SERVER_PID"
  SERVER_PID=""
}
cleanup() {
  stop_server
  stop_pid "$REDIS_PID"
  REDIS_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IDLE_BEFORE="$(idle_pct)"
say "CPU idle before the run: ${IDLE_BEFORE}% (other work on the machine skews every figure)"

# ---------------------------------------------------------------- redis
port_busy "$REDIS_PORT" && die "something already listens on 127.0.0.1:${REDIS_PORT}; set REDIS_PORT to a free port"
mkdir -p "$OUT/redis"
say "starting redis-server on 127.0.0.1:${REDIS_PORT} (no persistence; log: $OUT/redis.log)"
# nice itself, not run(): $! must be redis-server's pid (nice execs it), for
# its CPU time.
nice -n "$NICE" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --dir "$OUT/redis" --logfile "$OUT/redis.log" &
REDIS_PID=$!
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for _ in $(seq 100); do
  [ "$(rcli PING 2>/dev/null)" = PONG ] && break
  kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited: $(tail -n 5 "$OUT/redis.log")"
  sleep 0.1
done
[ "$(rcli PING 2>/dev/null)" = PONG ] || die "redis-server not ready after 10 s"
REDIS_VERSION="$(rcli INFO server | awk -F: '/^redis_version/ {sub(/\r/, "", $2); print $2}')"
flush_redis() { rcli FLUSHALL >/dev/null; }

# ---------------------------------------------------------------- envoy rule
ENVOY_RUNTIME="${OUT}/envoy-runtime"
mkdir -p "${ENVOY_RUNTIME}/ratelimit/config"
cat >"${ENVOY_RUNTIME}/ratelimit/config/bench.yaml" <<'EOF'
# envoy ratelimit rule for scripts/bench-redis.sh: the same limit as
# scripts/bench/redis.toml, a fixed window of 20 requests per second for each
# distinct user_id.
domain: bench
descriptors:
  - key: user_id
    rate_limit:
      unit: second
      requests_per_unit: 20
EOF

# The environment envoy ratelimit runs with, and nothing else from ours
# (it reads PORT, HOST, ... which a caller may have set for other things).
# Its defaults are kept for everything not named here; notably
# REDIS_POOL_SIZE=10, REDIS_PIPELINE_WINDOW=0 (flush each write; in this
# version it only applies to REDIS_TYPE=cluster), REDIS_PIPELINE_LIMIT=0
# (deprecated, no effect with radix v4), LOCAL_CACHE_SIZE_IN_BYTES=0 (no
# local cache of over-limit keys), STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=false.
ENVOY_ENV=(
  "PATH=/usr/bin:/bin"
  "HOME=${HOME:-/root}"
  "HOST=127.0.0.1" "PORT=${ENVOY_PORT}"
  "GRPC_HOST=127.0.0.1" "GRPC_PORT=${ENVOY_GRPC_PORT}"
  "DEBUG_HOST=127.0.0.1" "DEBUG_PORT=${ENVOY_DEBUG_PORT}"
  "USE_STATSD=false" "LOG_LEVEL=warn" "LOG_FORMAT=json"
  "CONFIG_TYPE=FILE"
  "RUNTIME_ROOT=${ENVOY_RUNTIME}" "RUNTIME_SUBDIRECTORY=ratelimit"
  "RUNTIME_APPDIRECTORY=config" "RUNTIME_WATCH_ROOT=false" "RUNTIME_IGNOREDOTFILES=true"
  "BACKEND_TYPE=redis" "REDIS_SOCKET_TYPE=tcp" "REDIS_TYPE=SINGLE"
  "REDIS_URL=127.0.0.1:${REDIS_PORT}"
  "CACHE_KEY_PREFIX=envoy-bench:"
)
# ENVOY_EXTRA_ENV="NAME=VALUE ...": more settings (or overrides: later wins),
# e.g. REDIS_POOL_SIZE=32 or LOCAL_CACHE_SIZE_IN_BYTES=1048576.
for kv in ${ENVOY_EXTRA_ENV:-}; do
  case "$kv" in
    [A-Z_]*=*) ENVOY_ENV+=("$kv") ;;
    *) die "ENVOY_EXTRA_ENV: '$kv' is not NAME=VALUE" ;;
  esac
done
printf '%s\n' "${ENVOY_ENV[@]}" >"$OUT/envoy-env.txt"

# ---------------------------------------------------------------- servers
# Sets S_ADDR, S_PATH, S_LUA, S_BODY for server $1.
server_target() {
  case "$1" in
    envoy)
      S_ADDR="127.0.0.1:${ENVOY_PORT}" S_PATH=/json S_LUA=scripts/bench/envoy-json.lua S_BODY=envoy
      ;;
    *)
      S_ADDR="127.0.0.1:${PORT}" S_PATH=/check S_LUA=scripts/bench/check.lua S_BODY=quotaflow
      ;;
  esac
}

# One check body for user $2 to server $1.
body_for() {
  if [ "$1" = envoy ]; then
    printf '{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"%s"}]}]}' "$2"
  else
    printf '{"user_id":"%s","method":"GET","path":"/orders"}' "$2"
  fi
}

# HTTP status of one check of user $2 to server $1.
check_once() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 -X POST -H 'Content-Type: application/json' \
    -d "$(body_for "$1" "$2")" "http://${S_ADDR}${S_PATH}" || true
}

start_server() { # name log-suffix
  local name="$1" log="$OUT/$1-$2"
  server_target "$name"
  port_busy "${S_ADDR##*:}" && die "something already listens on ${S_ADDR}; set PORT / ENVOY_PORT to a free port"
  flush_redis
  case "$name" in
    quotaflow | quotaflow-eval)
      say "starting $(label "$name"): $BIN serve --config $CONFIG --listen $S_ADDR (log: $log.log)"
      (
        # Only the settings below on top of the config file: none of the
        # caller's QUOTAFLOW__* overrides.
        while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^QUOTAFLOW__' || true)
        export QUOTAFLOW__STATE__BACKEND=redis
        export QUOTAFLOW__REDIS__URL="redis://127.0.0.1:${REDIS_PORT}/"
        if [ "$name" = quotaflow-eval ]; then
          export QUOTAFLOW__REDIS__MAX_BATCH=1
          export QUOTAFLOW__REDIS__CONNECTIONS="$CONNECTIONS"
        fi
        for kv in ${QUOTAFLOW_EXTRA_ENV:-}; do
          # shellcheck disable=SC2163 # exports NAME=VALUE as written
          export "$kv"
        done
        exec nice -n "$NICE" "$BIN" serve --config "$CONFIG" --listen "$S_ADDR" >"$log.log" 2>"$log.stderr"
      ) &
      SERVER_PID=$!
      local ready="http://${S_ADDR}/readyz"
      ;;
    envoy)
      say "starting $(label "$name"): $ENVOY_BIN on $S_ADDR (env: $OUT/envoy-env.txt; log: $log.log)"
      env -i "${ENVOY_ENV[@]}" nice -n "$NICE" "$ENVOY_BIN" >"$log.log" 2>"$log.stderr" &
      SERVER_PID=$!
      local ready="http://${S_ADDR}/healthcheck"
      ;;
  esac
  for _ in $(seq 150); do
    curl -sf -o /dev/null --max-time 1 "$ready" && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited: $(tail -n 20 "$log.stderr" "$log.log")"
    sleep 0.1
  done
  curl -sf -o /dev/null --max-time 1 "$ready" || die "$name not ready after 15 s: $(tail -n 20 "$log.stderr" "$log.log")"
  # A first check must be allowed (the rule is loaded, Redis answers).
  local code=""
  for _ in $(seq 50); do
    code="$(check_once "$name" user-00001)"
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || die "$name: a first check answered HTTP ${code:-none}, not 200: $(tail -n 20 "$log.stderr" "$log.log")"
}

# 45 checks of one fresh user as fast as one keep-alive curl sends them:
# within a second or two, so at most 40 can be allowed. Records PROBE[name].
declare -A PROBE=()
probe() {
  local name="$1" user="probe-$1" args=() codes ok refused
  for _ in $(seq 45); do args+=(-o /dev/null "http://${S_ADDR}${S_PATH}"); done
  codes="$(curl -s --max-time 10 -w '%{http_code}\n' -X POST -H 'Content-Type: application/json' \
    -d "$(body_for "$name" "$user")" "${args[@]}" || true)"
  ok="$(grep -c '^200$' <<<"$codes" || true)"
  refused="$(grep -c '^429$' <<<"$codes" || true)"
  PROBE[$name]="${ok}x200 ${refused}x429 $((45 - ok - refused))xother"
  say "probe, 45 quick checks of one user: ${PROBE[$name]}"
  if [ "$refused" -lt 5 ] || [ "$ok" -lt 20 ]; then
    warn "$name: the probe expected >= 20 allowed and >= 5 refused (limit 20/s)"
  fi
}

# ---------------------------------------------------------------- phases
declare -A MAX_RPS=() MAX_N=() MAX_NON2XX=() MAX_SOCKERR=() MAX_CPU=() MAX_RCPU=() MAX_CORES=()
declare -A FX_RATE=() FX_TPUT=() FX_P50=() FX_P99=() FX_MAX=() FX_CODES=() FX_ERRS=() FX_CPU=() FX_RCPU=() FX_429=()

phase_max() {
  local name="$1" f="$OUT/$1-max.txt" c0 c1 r0 r1
  say "$name: warm-up, wrk ${WARMUP} s"
  run timeout 60 wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s "$S_LUA" "http://${S_ADDR}${S_PATH}" >/dev/null
  say "$name: (a) maximum throughput: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s, keep-alive"
  c0="$(cpu_secs "$SERVER_PID")" r0="$(cpu_secs "$REDIS_PID")"
  run timeout $((DURATION + 30)) wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -s "$S_LUA" "http://${S_ADDR}${S_PATH}" >"$f"
  c1="$(cpu_secs "$SERVER_PID")" r1="$(cpu_secs "$REDIS_PID")"
  cat "$f" >&2
  MAX_RPS[$name]="$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$f")"
  MAX_N[$name]="$(awk '/requests in/ {print $1}' "$f")"
  MAX_NON2XX[$name]="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$f")"
  MAX_NON2XX[$name]="${MAX_NON2XX[$name]:-0}"
  MAX_SOCKERR[$name]="$(awk '/Socket errors:/ {sub(/^ *Socket errors: */, ""); print}' "$f")"
  MAX_SOCKERR[$name]="${MAX_SOCKERR[$name]:-none}"
  if [ -z "${MAX_RPS[$name]}" ] || [ "${MAX_RPS[$name]}" -le 0 ]; then
    die "$name: wrk reported no throughput"
  fi
  MAX_CPU[$name]="$(per_req_us "$c0" "$c1" "${MAX_N[$name]}")"
  MAX_RCPU[$name]="$(per_req_us "$r0" "$r1" "${MAX_N[$name]}")"
  MAX_CORES[$name]="$(awk -v a="$c0" -v b="$c1" -v x="$r0" -v y="$r1" -v d="$DURATION" \
    'BEGIN {printf "%.2f+%.2f", (b - a) / d, (y - x) / d}')"
}

phase_fixed() {
  local name="$1" rate="$2" j="$OUT/$1-fixed.json" c0 c1 r0 r1 n
  say "$name: warm-up, loadgen at ${rate}/s for ${WARMUP} s"
  GOGC=off run timeout 60 "$LOADGEN" -addr "$S_ADDR" -path "$S_PATH" -body "$S_BODY" -rate "$rate" \
    -duration "${WARMUP}s" -conns "$CONNECTIONS" -users "$BENCH_USERS" >/dev/null
  say "$name: (b) fixed rate: loadgen -rate $rate -duration ${DURATION}s -conns $CONNECTIONS, open loop"
  c0="$(cpu_secs "$SERVER_PID")" r0="$(cpu_secs "$REDIS_PID")"
  # GOGC=off: the generator allocates a few MB in all; no collector pauses.
  GOGC=off run timeout $((DURATION + 30)) "$LOADGEN" -addr "$S_ADDR" -path "$S_PATH" -body "$S_BODY" \
    -rate "$rate" -duration "${DURATION}s" -conns "$CONNECTIONS" -users "$BENCH_USERS" \
    -json "$j" >"$OUT/$name-fixed.txt"
  c1="$(cpu_secs "$SERVER_PID")" r1="$(cpu_secs "$REDIS_PID")"
  cat "$OUT/$name-fixed.txt" >&2
  n="$(jq -r '.requests' "$j")"
  FX_RATE[$name]="$rate"
  FX_TPUT[$name]="$(jq -r '.throughput | round' "$j")"
  FX_P50[$name]="$(jq -r '.p50_ms * 1000 | round / 1000' "$j")"
  FX_P99[$name]="$(jq -r '.p99_ms * 1000 | round / 1000' "$j")"
  FX_MAX[$name]="$(jq -r '.max_ms * 1000 | round / 1000' "$j")"
  FX_CODES[$name]="$(jq -r '.status_codes | to_entries | sort_by(.key) | map("\(.key):\(.value)") | join(" ")' "$j")"
  FX_ERRS[$name]="$(jq -r '[.errors[]] | add // 0' "$j")"
  FX_429[$name]="$(jq -r '.status_codes["429"] // 0' "$j")"
  FX_CPU[$name]="$(per_req_us "$c0" "$c1" "$n")"
  FX_RCPU[$name]="$(per_req_us "$r0" "$r1" "$n")"
  # The hot user sends rate/20 a second: over 20/s, some must be refused.
  if [ "${FX_429[$name]}" -eq 0 ] && [ "$rate" -gt 800 ]; then
    warn "$name: no 429 at the fixed rate: the hot user (${rate}/20 a second) was not refused"
  fi
}

save_metrics() {
  case "$1" in
    quotaflow | quotaflow-eval) curl -sf --max-time 2 "http://${S_ADDR}/metrics" >"$OUT/$1-$2-metrics.txt" || true ;;
  esac
}

# ---------------------------------------------------------------- pass 1
for s in $SERVERS; do
  start_server "$s" max
  probe "$s"
  phase_max "$s"
  if [ -n "${RATE:-}" ]; then
    phase_fixed "$s" "$RATE"
  fi
  save_metrics "$s" max
  stop_server
done

# ---------------------------------------------------------------- pass 2
if [ -z "${RATE:-}" ]; then
  MIN_MAX=""
  for s in $SERVERS; do
    if [ -z "$MIN_MAX" ] || [ "${MAX_RPS[$s]}" -lt "$MIN_MAX" ]; then MIN_MAX="${MAX_RPS[$s]}"; fi
  done
  FIXED_RATE=$((MIN_MAX / 2))
  [ "$FIXED_RATE" -ge 1 ] || die "the lowest maximum throughput is too low for a fixed rate"
  say "fixed rate for every server: ${FIXED_RATE} req/s (half the lowest maximum, ${MIN_MAX} req/s)"
  for s in $SERVERS; do
    start_server "$s" fixed
    phase_fixed "$s" "$FIXED_RATE"
    save_metrics "$s" fixed
    stop_server
  done
else
  FIXED_RATE="$RATE"
fi
stop_pid "$REDIS_PID"
REDIS_PID=""

# ---------------------------------------------------------------- summary
ratio() { # a / b with 2 decimals, n/a when either is missing
  awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a != "" && b != "" && a != "n/a" && b != "n/a" && b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'
}
has() { case " $SERVERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
get() { # array-name key: its value, or "" when the server did not run
  local -n arr="$1"
  if has "$2"; then echo "${arr[$2]:-}"; fi
}
# Refusals expected of the hot user at rate r for D seconds: it sends r/20
# a second and 20 a second are allowed (about; window edges shift it).
EXPECTED_429="$(awk -v r="$FIXED_RATE" -v d="$DURATION" 'BEGIN { x = (r / 20 - 20) * d; printf "%d", (x > 0) ? x : 0 }')"

{
  echo "# bench-redis: quotaflow Redis state mode vs envoy ratelimit"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), quotaflow $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src crates 2>/dev/null || echo ' (+ uncommitted changes)'),"
  echo "envoy ratelimit ${ENVOY_VERSION}, Redis ${REDIS_VERSION} (private, no persistence), $(nproc) cores shared by"
  echo "the server, Redis and the load tool; CPU idle before the run ${IDLE_BEFORE}%, nice ${NICE}."
  echo "Limit: per user, fixed window of 20 req/s. Load: ${BENCH_USERS} users + 1 hot user on 1 request in 20;"
  echo "(a) wrk -t${WRK_THREADS} -c${CONNECTIONS} ${DURATION} s, keep-alive; (b) loadgen open loop, ${CONNECTIONS} connections,"
  echo "${DURATION} s, latency from each request's due time. CPU us/req: server process / redis-server, each over the phase."
  echo
  echo "| server | (a) max req/s | (a) CPU us/req server + redis | (a) cores server+redis | (a) non-2xx | (a) socket errors | probe (45 checks, 1 user) |"
  echo "|---|---:|---:|---:|---:|---|---|"
  for s in $SERVERS; do
    echo "| $(label "$s") | ${MAX_RPS[$s]} | ${MAX_CPU[$s]} + ${MAX_RCPU[$s]} | ${MAX_CORES[$s]} | ${MAX_NON2XX[$s]} | ${MAX_SOCKERR[$s]} | ${PROBE[$s]} |"
  done
  echo
  echo "| server | (b) rate req/s | answered/s | p50 ms | p99 ms | max ms | CPU us/req server + redis | status codes | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|---:|"
  for s in $SERVERS; do
    echo "| $(label "$s") | ${FX_RATE[$s]} | ${FX_TPUT[$s]} | ${FX_P50[$s]} | ${FX_P99[$s]} | ${FX_MAX[$s]} | ${FX_CPU[$s]} + ${FX_RCPU[$s]} | ${FX_CODES[$s]} | ${FX_ERRS[$s]} |"
  done
  echo
  echo "Expected 429s in (b): about ${EXPECTED_429} (the hot user's $((FIXED_RATE / 20))/s less 20/s allowed, over ${DURATION} s)."
  echo
  echo "Ratios: max throughput A/B $(ratio "$(get MAX_RPS quotaflow)" "$(get MAX_RPS quotaflow-eval)"),"\
    "A/C $(ratio "$(get MAX_RPS quotaflow)" "$(get MAX_RPS envoy)");"\
    "p99 at the fixed rate C/A $(ratio "$(get FX_P99 envoy)" "$(get FX_P99 quotaflow)"),"\
    "B/A $(ratio "$(get FX_P99 quotaflow-eval)" "$(get FX_P99 quotaflow)")."
  echo
  if has envoy; then
    echo "envoy ratelimit settings: $(grep -v -e '^PATH=' -e '^HOME=' "$OUT/envoy-env.txt" | tr '\n' ' ')(not listed:"
    echo "its defaults, which are REDIS_POOL_SIZE=10, REDIS_PIPELINE_WINDOW=0, REDIS_PIPELINE_LIMIT=0, LOCAL_CACHE_SIZE_IN_BYTES=0)."
  fi
  if has quotaflow || has quotaflow-eval; then
    echo "quotaflow settings: $CONFIG + QUOTAFLOW__STATE__BACKEND=redis QUOTAFLOW__REDIS__URL=redis://127.0.0.1:${REDIS_PORT}/"
    echo "(B also QUOTAFLOW__REDIS__MAX_BATCH=1 QUOTAFLOW__REDIS__CONNECTIONS=${CONNECTIONS})${QUOTAFLOW_EXTRA_ENV:+ + ${QUOTAFLOW_EXTRA_ENV}}."
    echo "Not alike unless set: quotaflow's [redis] deny_cache (default on: a refused key is answered locally"
    echo "until its window ends) vs envoy's LOCAL_CACHE_SIZE_IN_BYTES (default 0: off)."
  fi
  echo "Raw results: $OUT/ (<server>-max.txt, <server>-fixed.{txt,json}, logs, metrics)."
} | tee "$OUT/summary.md"
