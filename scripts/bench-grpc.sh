#!/usr/bin/env bash
# gRPC benchmark: quotaflow's Envoy rate limit service against its own
# POST /check (same process, same load tool, same run) and against
# envoyproxy/ratelimit's gRPC service (same descriptors). Loopback only.
#
#   scripts/bench-grpc.sh
#   ROUNDS=1 DURATION=2 scripts/bench-grpc.sh      # a quick try
#
# The servers:
#   quotaflow        `quotaflow serve`, in memory (the embedded default, no
#                    Kafka, no Redis), HTTP on PORT and gRPC on GRPC_PORT;
#                    scripts/bench/grpc.toml: per user_id, a fixed window of
#                    20 requests per second
#   quotaflow-redis  the same over gRPC in the Redis state mode (one shared
#                    count in a private Redis), as envoy ratelimit counts
#   envoy            envoyproxy/ratelimit (pinned, scripts/tools.sh
#                    envoy-ratelimit), Redis backend, its gRPC port; rule: domain "bench",
#                    descriptor key user_id, 20 per second
#
# Each of ROUNDS rounds starts every server afresh and runs:
#   quotaflow: warm-up, then (a) fixed rate RATE req/s, open loop, DURATION
#     s, with scripts/bench/loadgen over HTTP/1.1 /check and over gRPC
#     (-proto grpc), in alternating order from round to round; (b) maximum
#     throughput with loadgen (closed loop, CONNECTIONS connections) over
#     both; (c) maximum gRPC throughput with ghz;
#   quotaflow-redis and envoy: warm-up, then (b) loadgen -proto grpc and
#     (c) ghz, at maximum throughput.
# loadgen's bodies cycle over BENCH_USERS users plus one hot user on 1 request
# in 20 (refused past 20/s); ghz's cycle over BENCH_USERS users (a -d
# template), and again with one hot user only (ghz-hot: static data, which
# costs ghz far less per call; all but 20 a second refused).
# Then $OUT/summary.md (also printed): the median of the rounds for every
# figure (requests/s, p50/p99/max, CPU microseconds per request of the server
# and of Redis from /proc/PID/stat), and the ratios gRPC/HTTP and
# quotaflow/envoy.
#
# Installs what is missing: ghz and grpcurl (scripts/tools.sh grpc), jq,
# curl, redis-server (Debian), envoy ratelimit (scripts/tools.sh), builds
# scripts/bench/loadgen and `cargo build --release` (SKIP_BUILD=1: use the
# release binary as it is).
#
# Environment (all optional):
#   ROUNDS=3  DURATION=10  RATE=5000  CONNECTIONS=32  BENCH_USERS=10000
#   GHZ_CONCURRENCY=64  GHZ_CONNECTIONS=8   ghz -c and --connections
#   SERVERS="quotaflow quotaflow-redis envoy"
#   PORT=18185 GRPC_PORT=18186 ENVOY_PORT=18195 (gRPC +1, debug +2)
#   REDIS_PORT=16395  NICE=0  SKIP_BUILD=0
# Results and logs: target/bench-grpc/ (under CARGO_TARGET_DIR when set).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
RATE="${RATE:-5000}"
CONNECTIONS="${CONNECTIONS:-32}"
BENCH_USERS="${BENCH_USERS:-10000}"
GHZ_CONCURRENCY="${GHZ_CONCURRENCY:-64}"
GHZ_CONNECTIONS="${GHZ_CONNECTIONS:-8}"
SERVERS="${SERVERS:-quotaflow quotaflow-redis envoy}"
PORT="${PORT:-18185}"
GRPC_PORT="${GRPC_PORT:-18186}"
ENVOY_PORT="${ENVOY_PORT:-18195}"
REDIS_PORT="${REDIS_PORT:-16395}"
NICE="${NICE:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
WARMUP=3
ENVOY_GRPC_PORT=$((ENVOY_PORT + 1))
ENVOY_DEBUG_PORT=$((ENVOY_PORT + 2))

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="${ROOT}/${TARGET_DIR}" ;; esac
OUT="${TARGET_DIR}/bench-grpc"
BIN="${TARGET_DIR}/release/quotaflow"
LOADGEN="${OUT}/loadgen"
RLS_CALL="envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit"

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'bench-grpc: %s\n' "$*" >&2
  exit 1
}

case "$ROUNDS$DURATION$RATE$CONNECTIONS$BENCH_USERS$GHZ_CONCURRENCY$GHZ_CONNECTIONS$PORT$GRPC_PORT$ENVOY_PORT$REDIS_PORT" in
  *[!0-9]*) die "ROUNDS, DURATION, RATE, CONNECTIONS, BENCH_USERS, GHZ_*, and the ports must be integers" ;;
esac
case "$NICE" in
  -[0-9] | -1[0-9] | [0-9] | 1[0-9]) ;;
  *) die "NICE must be an integer between -19 and 19" ;;
esac
if [ "$ROUNDS" -lt 1 ] || [ "$RATE" -lt 1 ] || [ "$CONNECTIONS" -lt 1 ]; then
  die "ROUNDS, RATE and CONNECTIONS must be at least 1"
fi
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 300 ]; then
  die "DURATION must be 1..300 seconds"
fi
for s in $SERVERS; do
  case "$s" in quotaflow | quotaflow-redis | envoy) ;; *) die "unknown server '$s' in SERVERS" ;; esac
done

# With sched_autogroup_enabled=1 the kernel weighs sessions against each
# other, so nice alone does not count against another session's build: set
# this session's autogroup nice too (restored on exit), as bench-stream.sh.
AUTOGROUP=""
if [ "$NICE" != 0 ] && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0)" = 1 ]; then
  AUTOGROUP_BEFORE=$(sed -n 's/.* nice \(-\{0,1\}[0-9]*\)$/\1/p' /proc/self/autogroup 2>/dev/null || true)
  if echo "$NICE" 2>/dev/null >/proc/self/autogroup; then
    AUTOGROUP="$(cat /proc/self/autogroup)"
  fi
fi

# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
has() { case " $SERVERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

# ---------------------------------------------------------------- tools
command -v jq >/dev/null || apt_install jq
command -v curl >/dev/null || apt_install curl
if has quotaflow-redis || has envoy; then
  command -v redis-server >/dev/null || apt_install redis-server
  command -v redis-cli >/dev/null || apt_install redis-tools
fi
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  apt_install golang-go
fi
GO="$(command -v go || echo /usr/local/go/bin/go)"
tools_env="$(scripts/tools.sh grpc)" || die "installing grpcurl and ghz failed (scripts/tools.sh grpc)"
eval "$tools_env"

mkdir -p "$OUT"
rm -rf "${OUT:?}"/*.txt "${OUT:?}"/*.json "${OUT:?}"/*.log "${OUT:?}"/*.stderr "${OUT:?}"/*.md "${OUT:?}"/*.tsv "${OUT:?}/envoy-runtime" "${OUT:?}/redis"

ENVOY_VERSION="n/a"
ENVOY_BIN=""
if has envoy; then
  envoy_env="$(scripts/tools.sh envoy-ratelimit)" || die "installing envoy ratelimit failed (scripts/tools.sh)"
  eval "$envoy_env"
  ENVOY_BIN="$ENVOY_RATELIMIT_BIN"
  ENVOY_VERSION="$("$GO" version -m "$ENVOY_BIN" 2>/dev/null |
    awk '$1 == "mod" && $2 == "github.com/envoyproxy/ratelimit" {print $3}')"
  ENVOY_VERSION="${ENVOY_VERSION:-unknown}"
fi

if [ "$SKIP_BUILD" = 1 ]; then
  say "SKIP_BUILD=1: using $BIN as it is"
else
  say "cargo build --release"
  cargo build --release
fi
[ -x "$BIN" ] || die "$BIN was not built"
say "go build scripts/bench/loadgen"
(cd scripts/bench/loadgen && GOTOOLCHAIN=local "$GO" build -o "$LOADGEN" .)

# ---------------------------------------------------------------- processes
SERVER_PID=""
REDIS_PID=""
stop_pid() {
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
cleanup() {
  stop_pid "$SERVER_PID"
  SERVER_PID=""
  stop_pid "$REDIS_PID"
  REDIS_PID=""
  if [ -n "$AUTOGROUP" ]; then echo "${AUTOGROUP_BEFORE:-0}" 2>/dev/null >/proc/self/autogroup || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IDLE_BEFORE="$(idle_pct)"
say "CPU idle before the run: ${IDLE_BEFORE}%"

REDIS_VERSION="n/a"
if has quotaflow-redis || has envoy; then
  port_busy "$REDIS_PORT" && die "something already listens on 127.0.0.1:${REDIS_PORT}; set REDIS_PORT"
  mkdir -p "$OUT/redis"
  nice -n "$NICE" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --dir "$OUT/redis" --logfile "$OUT/redis.log" &
  REDIS_PID=$!
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  [ "$(redis-cli -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ] || die "redis-server not ready"
  REDIS_VERSION="$(redis-cli -p "$REDIS_PORT" INFO server | awk -F: '/^redis_version/ {sub(/\r/, "", $2); print $2}')"
fi

ENVOY_RUNTIME="${OUT}/envoy-runtime"
mkdir -p "${ENVOY_RUNTIME}/ratelimit/config"
cat >"${ENVOY_RUNTIME}/ratelimit/config/bench.yaml" <<'EOF'
# The limit of scripts/bench/grpc.toml: 20 requests per second per user_id.
domain: bench
descriptors:
  - key: user_id
    rate_limit:
      unit: second
      requests_per_unit: 20
EOF
ENVOY_ENV=(
  "PATH=/usr/bin:/bin" "HOME=${HOME:-/root}"
  "HOST=127.0.0.1" "PORT=${ENVOY_PORT}"
  "GRPC_HOST=127.0.0.1" "GRPC_PORT=${ENVOY_GRPC_PORT}"
  "DEBUG_HOST=127.0.0.1" "DEBUG_PORT=${ENVOY_DEBUG_PORT}"
  "USE_STATSD=false" "LOG_LEVEL=warn" "LOG_FORMAT=json"
  "CONFIG_TYPE=FILE" "RUNTIME_ROOT=${ENVOY_RUNTIME}" "RUNTIME_SUBDIRECTORY=ratelimit"
  "RUNTIME_APPDIRECTORY=config" "RUNTIME_WATCH_ROOT=false" "RUNTIME_IGNOREDOTFILES=true"
  "BACKEND_TYPE=redis" "REDIS_SOCKET_TYPE=tcp" "REDIS_TYPE=SINGLE"
  "REDIS_URL=127.0.0.1:${REDIS_PORT}" "CACHE_KEY_PREFIX=envoy-bench-grpc:"
)

# Starts server $1 (round $2); sets SERVER_PID and S_GRPC.
start_server() {
  local name="$1" log="$OUT/$1-r$2"
  [ -n "$REDIS_PID" ] && redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
  case "$name" in
    quotaflow | quotaflow-redis)
      port_busy "$PORT" && die "something already listens on 127.0.0.1:$PORT"
      port_busy "$GRPC_PORT" && die "something already listens on 127.0.0.1:$GRPC_PORT"
      (
        while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^QUOTAFLOW__' || true)
        export QUOTAFLOW__GRPC__LISTEN="127.0.0.1:${GRPC_PORT}"
        if [ "$name" = quotaflow-redis ]; then
          export QUOTAFLOW__STATE__BACKEND=redis
          export QUOTAFLOW__REDIS__URL="redis://127.0.0.1:${REDIS_PORT}/"
          export QUOTAFLOW__SECURITY__FINGERPRINT_KEY=quotaflow-bench-grpc
        fi
        exec nice -n "$NICE" "$BIN" serve --config scripts/bench/grpc.toml --listen "127.0.0.1:${PORT}" \
          >"$log.log" 2>"$log.stderr"
      ) &
      SERVER_PID=$!
      S_GRPC="127.0.0.1:${GRPC_PORT}"
      local ready="http://127.0.0.1:${PORT}/readyz"
      ;;
    envoy)
      env -i "${ENVOY_ENV[@]}" nice -n "$NICE" "$ENVOY_BIN" >"$log.log" 2>"$log.stderr" &
      SERVER_PID=$!
      S_GRPC="127.0.0.1:${ENVOY_GRPC_PORT}"
      local ready="http://127.0.0.1:${ENVOY_PORT}/healthcheck"
      ;;
  esac
  for _ in $(seq 150); do
    curl -sf -o /dev/null --max-time 1 "$ready" && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited: $(tail -n 20 "$log.stderr" "$log.log")"
    sleep 0.1
  done
  curl -sf -o /dev/null --max-time 1 "$ready" || die "$name not ready after 15 s"
  # The same call from a real client: the rule is loaded and answers.
  local answer
  answer="$(grpcurl -plaintext -max-time 5 -import-path proto -proto envoy/service/ratelimit/v3/rls.proto \
    -d '{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"probe"}]}]}' \
    "$S_GRPC" envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit)" ||
    die "$name: grpcurl ShouldRateLimit failed"
  jq -e '.overallCode == "OK" and (.statuses[0].currentLimit.requestsPerUnit == 20)' <<<"$answer" >/dev/null ||
    die "$name: unexpected first answer: $answer"
}

stop_server() {
  stop_pid "$SERVER_PID"
  SERVER_PID=""
}

# One result line: round server phase tool rps p50 p99 max cpu_server cpu_redis cpu_tool codes
RESULTS="$OUT/results.tsv"
printf 'round\tserver\tphase\ttool\trps\tp50_ms\tp99_ms\tmax_ms\tcpu_us\tredis_cpu_us\ttool_cpu_us\tcodes\n' >"$RESULTS"
TIMES="$OUT/time.txt"
# CPU seconds (user + system) the last timed load tool used.
tool_secs() { awk '{printf "%.2f", $1 + $2}' "$TIMES"; }

cpu_of_redis() { if [ -n "$REDIS_PID" ]; then cpu_secs "$REDIS_PID"; else echo 0; fi; }

# loadgen against the current server: round server phase proto rate(0 = max)
run_loadgen() {
  local round="$1" server="$2" phase="$3" proto="$4" rate="$5" j c0 c1 r0 r1 n addr
  j="$OUT/$server-r$round-$phase-$proto.json"
  if [ "$proto" = grpc ]; then addr="$S_GRPC"; else addr="127.0.0.1:${PORT}"; fi
  say "r$round $server ($phase) loadgen -proto $proto -rate $rate -duration ${DURATION}s -conns $CONNECTIONS"
  c0="$(cpu_secs "$SERVER_PID")" r0="$(cpu_of_redis)"
  GOGC=off run /usr/bin/time -f '%U %S' -o "$TIMES" timeout $((DURATION + 30)) "$LOADGEN" -proto "$proto" -addr "$addr" -path /check \
    -rate "$rate" -duration "${DURATION}s" -conns "$CONNECTIONS" -users "$BENCH_USERS" -json "$j" \
    >"${j%.json}.txt"
  c1="$(cpu_secs "$SERVER_PID")" r1="$(cpu_of_redis)"
  cat "${j%.json}.txt" >&2
  n="$(jq -r '.requests' "$j")"
  [ "$n" -gt 0 ] || die "$server: loadgen got no answers"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$server" "$phase" "loadgen-$proto" \
    "$(jq -r '.throughput | round' "$j")" "$(jq -r '.p50_ms' "$j")" "$(jq -r '.p99_ms' "$j")" \
    "$(jq -r '.max_ms' "$j")" "$(per_req_us "$c0" "$c1" "$n")" "$(per_req_us "$r0" "$r1" "$n")" \
    "$(per_req_us 0 "$(tool_secs)" "$n")" \
    "$(jq -r '[(.status_codes | to_entries | sort_by(.key) | map("\(.key):\(.value)") | join(" ")), ((.errors | add) // 0 | "errors:\(.)")] | join(" ")' "$j")" >>"$RESULTS"
}

# ghz's call data: "spread", BENCH_USERS users in turn (a template, which
# ghz renders and parses for every call: its dearest mode), or "hot", one
# user for every call (parsed once: about 2.5 times cheaper for ghz; all but
# 20 a second refused).
ghz_data() {
  if [ "$1" = hot ]; then
    printf '%s\n' --disable-template-data --disable-template-functions \
      '--data={"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"hot-user"}]}]}'
  else
    printf -- '--data={"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"user-{{mod .RequestNumber %d}}"}]}]}\n' "$BENCH_USERS"
  fi
}

# ghz at maximum throughput against the current server: round server
# duration data ("spread" or "hot"), and "warm-up" for a run not recorded
run_ghz() {
  local round="$1" server="$2" secs="$3" data="$4" j c0 c1 r0 r1 n tool=ghz args=()
  [ "$data" = hot ] && tool=ghz-hot
  mapfile -t args < <(ghz_data "$data")
  j="$OUT/$server-r$round-$tool.json"
  say "r$round $server (max) ghz -c $GHZ_CONCURRENCY --connections $GHZ_CONNECTIONS -z ${secs}s, $data data"
  c0="$(cpu_secs "$SERVER_PID")" r0="$(cpu_of_redis)"
  run /usr/bin/time -f '%U %S' -o "$TIMES" timeout $((secs + 30)) ghz --insecure --proto envoy/service/ratelimit/v3/rls.proto --import-paths proto \
    --call "$RLS_CALL" "${args[@]}" -c "$GHZ_CONCURRENCY" --connections "$GHZ_CONNECTIONS" \
    -z "${secs}s" -O json "$S_GRPC" >"$j"
  c1="$(cpu_secs "$SERVER_PID")" r1="$(cpu_of_redis)"
  [ "${5:-}" = warm-up ] && return 0
  n="$(jq -r '.count' "$j")"
  [ "$n" -gt 0 ] || die "$server: ghz got no answers"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$server" max "$tool" \
    "$(jq -r '.rps | round' "$j")" \
    "$(jq -r '[.latencyDistribution[] | select(.percentage == 50) | .latency / 1e6][0]' "$j")" \
    "$(jq -r '[.latencyDistribution[] | select(.percentage == 99) | .latency / 1e6][0]' "$j")" \
    "$(jq -r '.slowest / 1e6' "$j")" "$(per_req_us "$c0" "$c1" "$n")" "$(per_req_us "$r0" "$r1" "$n")" \
    "$(per_req_us 0 "$(tool_secs)" "$n")" \
    "$(jq -r '[(.statusCodeDistribution | to_entries | map("\(.key):\(.value)") | join(" ")), "errors:\((.errorDistribution // {}) | add // 0)"] | join(" ")' "$j")" >>"$RESULTS"
  jq -c '{count, rps, statusCodeDistribution}' "$j" >&2
}

# ---------------------------------------------------------------- rounds
for round in $(seq "$ROUNDS"); do
  if has quotaflow; then
    start_server quotaflow "$round"
    GOGC=off run "$LOADGEN" -addr "127.0.0.1:${PORT}" -rate "$RATE" -duration "${WARMUP}s" -conns "$CONNECTIONS" >/dev/null
    GOGC=off run "$LOADGEN" -proto grpc -addr "$S_GRPC" -rate "$RATE" -duration "${WARMUP}s" -conns "$CONNECTIONS" >/dev/null
    # Alternate which transport goes first, so neither always runs warmer.
    if [ $((round % 2)) -eq 1 ]; then order="http1 grpc"; else order="grpc http1"; fi
    for p in $order; do run_loadgen "$round" quotaflow fixed "$p" "$RATE"; done
    for p in $order; do run_loadgen "$round" quotaflow max "$p" 0; done
    run_ghz "$round" quotaflow "$DURATION" spread
    run_ghz "$round" quotaflow "$DURATION" hot
    curl -sf --max-time 2 "http://127.0.0.1:${PORT}/metrics" >"$OUT/quotaflow-r$round-metrics.txt" || true
    stop_server
  fi
  for s in quotaflow-redis envoy; do
    has "$s" || continue
    start_server "$s" "$round"
    run_ghz "$round" "$s" "$WARMUP" spread warm-up
    run_loadgen "$round" "$s" max grpc 0
    run_ghz "$round" "$s" "$DURATION" spread
    run_ghz "$round" "$s" "$DURATION" hot
    stop_server
  done
done
stop_pid "$REDIS_PID"
REDIS_PID=""

# ---------------------------------------------------------------- summary
python3 - "$RESULTS" "$OUT/summary.md" <<EOF
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
groups = {}
for r in rows:
    groups.setdefault((r["server"], r["phase"], r["tool"]), []).append(r)
def med(rs, k):
    vals = [float(r[k]) for r in rs if r[k] not in ("", "n/a", "null")]
    return statistics.median(vals) if vals else float("nan")
out = []
out.append("# bench-grpc: quotaflow gRPC (Envoy RLS) vs /check vs envoy ratelimit")
out.append("")
out.append("$(date -u +%Y-%m-%dT%H:%M:%SZ), quotaflow $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src crates 2>/dev/null || echo ' (+ uncommitted changes)'), envoy ratelimit ${ENVOY_VERSION},")
out.append("Redis ${REDIS_VERSION}, $(nproc) cores shared by servers, Redis and load tools; CPU idle before the run ${IDLE_BEFORE}%; nice ${NICE}, autogroup: ${AUTOGROUP:-unchanged}.")
out.append("Medians of ${ROUNDS} rounds of ${DURATION} s. Limit: 20 req/s per user_id (fixed window). loadgen: ${CONNECTIONS} connections,")
out.append("${BENCH_USERS} users + 1 hot user on 1 request in 20; fixed rate ${RATE} req/s open loop, latency from due time. ghz: -c ${GHZ_CONCURRENCY}")
out.append("--connections ${GHZ_CONNECTIONS}, ${BENCH_USERS} users. CPU us/req: server process + redis-server, from /proc over the phase;")
out.append("the load tool's from /usr/bin/time.")
out.append("")
out.append("| server | phase | tool | req/s | p50 ms | p99 ms | max ms | CPU us/req server + redis | load tool CPU us/req | answers (last round) |")
out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
for (s, p, t), rs in groups.items():
    out.append(f"| {s} | {p} | {t} | {med(rs,'rps'):.0f} | {med(rs,'p50_ms'):.3f} | {med(rs,'p99_ms'):.3f} | {med(rs,'max_ms'):.2f} | {med(rs,'cpu_us'):.1f} + {med(rs,'redis_cpu_us'):.1f} | {med(rs,'tool_cpu_us'):.1f} | {rs[-1]['codes']} |")
def get(s, p, t, k):
    rs = groups.get((s, p, t))
    return med(rs, k) if rs else float("nan")
def ratio(a, b):
    return f"{a / b:.2f}" if b and b == b and a == a else "n/a"
out.append("")
out.append("Ratios (of the medians):")
out.append(f"- fixed rate, gRPC / HTTP /check: p50 {ratio(get('quotaflow','fixed','loadgen-grpc','p50_ms'), get('quotaflow','fixed','loadgen-http1','p50_ms'))},"
           f" p99 {ratio(get('quotaflow','fixed','loadgen-grpc','p99_ms'), get('quotaflow','fixed','loadgen-http1','p99_ms'))},"
           f" server CPU per request {ratio(get('quotaflow','fixed','loadgen-grpc','cpu_us'), get('quotaflow','fixed','loadgen-http1','cpu_us'))}")
out.append(f"- max throughput (loadgen), gRPC / HTTP /check: {ratio(get('quotaflow','max','loadgen-grpc','rps'), get('quotaflow','max','loadgen-http1','rps'))}")
for s in ("quotaflow", "quotaflow-redis"):
    out.append(f"- max gRPC throughput, {s} / envoy ratelimit: loadgen {ratio(get(s,'max','loadgen-grpc','rps'), get('envoy','max','loadgen-grpc','rps'))},"
               f" ghz {ratio(get(s,'max','ghz','rps'), get('envoy','max','ghz','rps'))},"
               f" ghz hot key {ratio(get(s,'max','ghz-hot','rps'), get('envoy','max','ghz-hot','rps'))}")
out.append("")
out.append("Raw results: $OUT/ (results.tsv, <server>-r<round>-*.json|txt, logs).")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
EOF
