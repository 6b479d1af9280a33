#!/usr/bin/env bash
# Kafka stream-processor benchmark: quotaflow against a raw consumer, and
# request-to-decision latency, on the real broker and Redis, loopback only.
#
#   scripts/bench-stream.sh
#
# 1. starts Kafka and Redis (scripts/services.sh up; idempotent), builds the
#    release binary and the stream bench tool (tools/stream-bench);
# 2. creates a fresh topic of PARTITIONS partitions and pre-fills it with
#    COUNT Avro request events (quotaflow::simulate's traffic mix, produced
#    with the producer `quotaflow simulate --kafka` uses);
# 3. ROUNDS rounds, alternating which goes first:
#    (a) raw: a consumer-group member with quotaflow's consumer settings
#        that polls and discards until it has seen COUNT records;
#    (b) processor: `quotaflow serve --config scripts/bench/stream/throughput.toml`
#        (the five limits of config/default.toml, Redis checkpoints every 5 s)
#        with a fresh group and Redis key prefix, timed through /metrics
#        until it has processed COUNT events (and until its checkpoints
#        cover them);
#    both as events/s from the first record seen to the last; then, unless
#    FLOORS=0, the raw consumer again doing the least any limiter must do:
#    decode each event, and decode plus one keyed state lookup;
# 4. a single-threaded CPU cost per event of each step (quotaflow's decoder,
#    apache-avro's generic one for comparison, the limits), with the
#    throughput limits and with the same limits out of reach
#    (scripts/bench/stream/no-refusals.toml);
# 5. latency, LAT_ROUNDS times: a fresh processor (scripts/bench/stream/
#    latency.toml: per-user token bucket of 5, 1/s) on fresh topics, logging
#    its checkpoints (debug) to attribute delays; the load is simulate's mix
#    with the hot users' starts staggered over the first second, so their
#    BLOCKs spread evenly in time; LAT_WARMUP + LAT_DURATION
#    seconds of load at RATE (default: half the median processor throughput
#    of step 3), the first LAT_WARMUP seconds not counted; every BLOCK
#    decision's timestamp (decisions topic with LogAppendTime) minus its
#    request's produce timestamp (CreateTime): p50/p99/max per run, median
#    p99 over the runs; when the load generator could not sustain RATE (the
#    target runs' achieved rate fell more than 5% short: the machine's live
#    ceiling), LAT_ROUNDS more runs at half of that ceiling; then, unless
#    DIAGNOSE=0, the same with checkpoints every 1h and at half of RATE;
# 6. prints the summary and stops what it started, by pid (also on error or
#    Ctrl-C); deletes its topics and Redis keys unless KEEP=1.
#
# The broker is whatever `scripts/services.sh up` gives: by default the
# shared one on 127.0.0.1:9092 with the C1-only JIT. For a dedicated broker
# with the full JIT, as services.sh recommends for benchmarks:
#   KAFKA_PORT=19092 KAFKA_JVM_PERFORMANCE_OPTS=-XX:+UseG1GC scripts/bench-stream.sh
#   KAFKA_PORT=19092 scripts/services.sh clean kafka     # afterwards
#
# Environment (all optional):
#   COUNT=2000000  PARTITIONS=4  ROUNDS=5
#   USERS=100000  HOT_USERS=100  EVENT_RATE=40000   (fill: event-time rate)
#   LAT_ROUNDS=3  LAT_DURATION=20  LAT_WARMUP=3  LAT_USERS=100000  LAT_HOT_USERS=200
#   RATE=<events/s>  fixed rate for step 5 instead of half of step 3
#   NICE=-10         run quotaflow, the raw consumer and the load generator at
#                    this nice level (negative needs root), so that other work
#                    on a shared machine disturbs the measurement less; where
#                    the kernel groups scheduling by session (autogroup), the
#                    level is also set on this script's session, since nice
#                    alone does not weigh against other sessions. The broker
#                    and Redis (their own sessions) keep theirs
#   DIAGNOSE=0       skip the diagnostic latency passes (step 5 again with
#                    checkpoints every 1h, to isolate checkpoint stalls; and
#                    at half of RATE, to see the effect of machine load)
#   FLOORS=0         skip the floor rounds of step 3 (decode; decode + lookup)
#   KEEP=1           keep topics and Redis keys
# Results: target/bench-stream/ (under CARGO_TARGET_DIR when set):
# results.jsonl (one JSON line per measurement), summary.json, logs.
# See docs/benchmarks.md (section 5).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT="${COUNT:-2000000}"
PARTITIONS="${PARTITIONS:-4}"
ROUNDS="${ROUNDS:-5}"
USERS="${USERS:-100000}"
HOT_USERS="${HOT_USERS:-100}"
EVENT_RATE="${EVENT_RATE:-40000}"
LAT_DURATION="${LAT_DURATION:-20}"
LAT_WARMUP="${LAT_WARMUP:-3}"
LAT_ROUNDS="${LAT_ROUNDS:-3}"
LAT_USERS="${LAT_USERS:-100000}"
LAT_HOT_USERS="${LAT_HOT_USERS:-200}"
KEEP="${KEEP:-0}"
NICE="${NICE:-0}"
DIAGNOSE="${DIAGNOSE:-1}"
FLOORS="${FLOORS:-1}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OUT="${TARGET_DIR}/bench-stream"
RUN="qfbench-$(date +%s)-$$"
RESULTS="$OUT/results.jsonl"

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'bench-stream: %s\n' "$*" >&2
  exit 1
}

case "$NICE" in
  -[0-9] | -1[0-9] | [0-9] | 1[0-9]) ;;
  *) die "NICE must be an integer between -19 and 19" ;;
esac
case "$COUNT$PARTITIONS$ROUNDS$USERS$HOT_USERS$EVENT_RATE$LAT_DURATION$LAT_WARMUP$LAT_ROUNDS$LAT_USERS$LAT_HOT_USERS${RATE:-0}" in
  *[!0-9]*) die "COUNT, PARTITIONS, ROUNDS, USERS, HOT_USERS, EVENT_RATE, LAT_* and RATE must be integers" ;;
esac

PIDS=()   # quotaflow processes this script started
TOPICS=() # topics this script created

# Stop one process we started: TERM (it drains and writes final
# checkpoints), KILL after 60 s.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "pid $pid did not stop within 60 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ -n ${AUTOGROUP:-} ]]; then echo "${AUTOGROUP_BEFORE:-0}" 2>/dev/null >/proc/self/autogroup || true; fi
  if [[ $KEEP != 1 && -n ${BENCH:-} && -n ${KAFKA_BOOTSTRAP_SERVERS:-} ]]; then
    if ((${#TOPICS[@]} > 0)); then
      # shellcheck disable=SC2046
      timeout 60 "$BENCH" topics --delete $(printf '%s\n' "${TOPICS[@]}" | sort -u) >/dev/null 2>&1 || true
    fi
    if [[ -n ${REDIS_URL:-} ]]; then
      timeout 60 redis-cli -u "$REDIS_URL" --scan --pattern "$RUN-*" 2>/dev/null |
        timeout 60 xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$OUT"
rm -f "$OUT"/*.log
: >"$RESULTS"

AUTOGROUP=""
AUTOGROUP_BEFORE=""
if [[ $NICE != 0 && $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo 0) == 1 ]]; then
  AUTOGROUP_BEFORE=$(sed -n 's/.* nice \(-\{0,1\}[0-9]*\)$/\1/p' /proc/self/autogroup 2>/dev/null || true)
  if echo "$NICE" 2>/dev/null >/proc/self/autogroup; then
    AUTOGROUP="$(cat /proc/self/autogroup)"
  else
    say "could not set this session's autogroup nice to $NICE; nice alone applies"
  fi
fi

say "starting Kafka and Redis (scripts/services.sh up)"
env_lines=$(scripts/services.sh up) || die "scripts/services.sh up failed"
eval "$env_lines"
[[ $KAFKA_BOOTSTRAP_SERVERS == 127.0.0.1:* && $REDIS_URL == redis://127.0.0.1:* ]] ||
  die "expected loopback services, got $KAFKA_BOOTSTRAP_SERVERS and $REDIS_URL"
BROKER_PID=$(scripts/services.sh status 2>/dev/null | sed -n 's/^kafka: running (pid \([0-9]*\)).*/\1/p')
[[ -n $BROKER_PID ]] || die "cannot find the Kafka broker's pid"

say "building (release): quotaflow and the stream bench tool"
timeout 1800 cargo build --release -p quotaflow -p stream-bench --bins >"$OUT/build.log" 2>&1 ||
  die "cargo build failed (see $OUT/build.log)"
BENCH="$TARGET_DIR/release/stream-bench"
QUOTAFLOW="$TARGET_DIR/release/quotaflow"
[[ -x $BENCH && -x $QUOTAFLOW ]] || die "build produced no bench tool or binary"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
  echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "NICE: $NICE; autogroup: ${AUTOGROUP:-unchanged} (sched_autogroup_enabled=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo n/a))"
  echo "kafka: $(scripts/services.sh status 2>/dev/null | head -n1)"
  echo "broker JVM flags: $(tr '\0' ' ' <"/proc/$BROKER_PID/cmdline" | grep -o -- '-X[^ ]*' | grep -v -- '-Xlog\|SharedArchive' | tr '\n' ' ')"
  echo "busiest processes at start:"
  ps -eo pcpu,comm --sort=-pcpu | head -n 8
} >"$OUT/machine.txt"
say "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) (see $OUT/machine.txt)"

# Start `quotaflow serve` on CONFIG for group/prefix NAME and requests topic
# TOPIC, checkpointing every INTERVAL (default: the config's); sets QF_PID
# and QF_ADDR.
start_quotaflow() {
  local config=$1 name=$2 topic=$3 interval=${4:-} log="$OUT/$2.log" i
  local extra=()
  [[ -n $interval ]] && extra+=("QUOTAFLOW__STREAM__CHECKPOINT_INTERVAL=$interval")
  # Latency runs: log each checkpoint (a debug event) to attribute delays.
  [[ -n ${QF_LOG_CHECKPOINTS:-} ]] && extra+=("RUST_LOG=info,quotaflow::stream::worker=debug")
  env "${extra[@]}" QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" \
    QUOTAFLOW__REDIS__URL="$REDIS_URL" \
    QUOTAFLOW__KAFKA__GROUP_ID="$name" \
    QUOTAFLOW__REDIS__KEY_PREFIX="$name" \
    QUOTAFLOW__KAFKA__REQUESTS_TOPIC="$topic" \
    QUOTAFLOW__KAFKA__DECISIONS_TOPIC="$name-decisions" \
    QUOTAFLOW__KAFKA__ALERTS_TOPIC="$name-alerts" \
    QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC="$name-dlq" \
    QUOTAFLOW__KAFKA__CONFIG_TOPIC="$name-config" \
    nice -n "$NICE" "$QUOTAFLOW" serve --config "$config" --listen 127.0.0.1:0 >"$log" 2>&1 &
  QF_PID=$!
  PIDS+=("$QF_PID")
  TOPICS+=("$name-decisions" "$name-alerts" "$name-dlq")
  QF_ADDR=""
  for ((i = 0; i < 300; i++)); do
    QF_ADDR=$(grep -m1 '"event":"listening"' "$log" 2>/dev/null | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true)
    [[ -n $QF_ADDR ]] && break
    kill -0 "$QF_PID" 2>/dev/null || die "quotaflow exited at start; see $log"
    sleep 0.1
  done
  [[ $QF_ADDR == 127.0.0.1:* ]] || die "quotaflow did not log its listening address within 30 s; see $log"
}

# Wait (≤ 60 s) until the processor at $QF_ADDR owns all partitions.
wait_owned() {
  local i owned
  for ((i = 0; i < 600; i++)); do
    owned=$(curl -s --max-time 2 "http://$QF_ADDR/metrics" | sed -n 's/^quotaflow_partitions_owned \([0-9]*\)$/\1/p' || true)
    [[ ${owned:-0} -ge $PARTITIONS ]] && return 0
    sleep 0.1
  done
  die "quotaflow at $QF_ADDR owns ${owned:-0} of $PARTITIONS partitions after 60 s"
}

stop_quotaflow() {
  stop_pid "$QF_PID"
}

# ------------------------------------------------------------------ fill --
REQUESTS="$RUN-requests"
say "creating $REQUESTS ($PARTITIONS partitions) and filling it with $COUNT events"
TOPICS+=("$REQUESTS")
timeout 120 "$BENCH" topics "$REQUESTS:$PARTITIONS" >/dev/null
timeout 1200 "$BENCH" fill --topic "$REQUESTS" --count "$COUNT" --users "$USERS" \
  --hot-users "$HOT_USERS" --event-rate "$EVENT_RATE" | tee -a "$RESULTS" >&2

# ------------------------------------------------------------ throughput --
run_raw() {
  say "round $1: raw consumer"
  timeout 600 nice -n "$NICE" "$BENCH" raw --topic "$REQUESTS" --count "$COUNT" --group "$RUN-raw-$1" \
    --broker-pid "$BROKER_PID" --label "$1" | tee -a "$RESULTS" >&2
}

# The least work any limiter must do per event, on the same consumer: decode
# it, then also look up one key. Not the baseline; they show how much of the
# raw consumer's rate the target leaves for the limits themselves.
run_floors() {
  ((FLOORS)) || return 0
  for work in decode decode-lookup; do
    say "round $1: raw consumer that does $work"
    timeout 600 nice -n "$NICE" "$BENCH" raw --topic "$REQUESTS" --count "$COUNT" \
      --group "$RUN-$work-$1" --broker-pid "$BROKER_PID" --label "$1" --work "$work" \
      | tee -a "$RESULTS" >&2
  done
}

run_processor() {
  local name="$RUN-qf-$1"
  say "round $1: quotaflow serve ($name)"
  start_quotaflow scripts/bench/stream/throughput.toml "$name" "$REQUESTS"
  timeout 900 "$BENCH" watch --metrics "$QF_ADDR" --pid "$QF_PID" --count "$COUNT" \
    --prefix "$name" --group "$name" --topic "$REQUESTS" --partitions "$PARTITIONS" \
    --broker-pid "$BROKER_PID" --label "$1" | tee -a "$RESULTS" >&2
  stop_quotaflow
}

for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2 == 1)); then
    run_raw "$r"
    run_processor "$r"
  else
    run_processor "$r"
    run_raw "$r"
  fi
  run_floors "$r"
done

for config in throughput no-refusals; do
  say "CPU breakdown per event (one thread, 300000 events of $REQUESTS, $config.toml)"
  timeout 600 nice -n "$NICE" "$BENCH" breakdown --topic "$REQUESTS" --count 300000 \
    --config "scripts/bench/stream/$config.toml" | tee -a "$RESULTS" >&2
done

# --------------------------------------------------------------- latency --
if [[ -z ${RATE:-} ]]; then
  RATE=$("$BENCH" summarize "$RESULTS" --half-rate)
fi
# run_latency LABEL INTERVAL RATE: fresh topics and processor, LAT_DURATION s of load.
run_latency() {
  local label=$1 interval=$2 rate=$3 lat="$RUN-lat-$1"
  say "latency ($label): $LAT_DURATION s at $rate events/s, checkpoints every $interval (hot users $LAT_HOT_USERS of $LAT_USERS)"
  TOPICS+=("$lat-requests" "$lat-decisions" "$lat-alerts" "$lat-dlq") # also on failure below
  timeout 120 "$BENCH" topics "$lat-requests:$PARTITIONS" "$lat-decisions:1:logappend" \
    "$lat-alerts:1" "$lat-dlq:1" >/dev/null
  QF_LOG_CHECKPOINTS=1 start_quotaflow scripts/bench/stream/latency.toml "$lat" "$lat-requests" "$interval"
  wait_owned
  timeout $((LAT_WARMUP + LAT_DURATION + 600)) nice -n "$NICE" "$BENCH" latency --topic "$lat-requests" \
    --decisions "$lat-decisions" --metrics "$QF_ADDR" --pid "$QF_PID" --rate "$rate" \
    --duration-secs "$LAT_DURATION" --warmup-secs "$LAT_WARMUP" --users "$LAT_USERS" --hot-users "$LAT_HOT_USERS" \
    --broker-pid "$BROKER_PID" --label "$label" --checkpoint-interval "$interval" \
    --log "$OUT/$lat.log" |
    tee -a "$RESULTS" >&2
  stop_quotaflow
}

for ((r = 1; r <= LAT_ROUNDS; r++)); do
  run_latency "target-$r" 5s "$RATE"
done
# When the machine cannot even produce that rate live (load generator,
# broker and quotaflow share the cores), also measure at half of what it
# did sustain: the live ceiling.
LIVE_HALF=$("$BENCH" summarize "$RESULTS" --live-half-rate)
if ((LIVE_HALF > 0)); then
  say "the load generator fell short of $RATE events/s: live ceiling $((LIVE_HALF * 2))/s; measuring at half of it too"
  for ((r = 1; r <= LAT_ROUNDS; r++)); do
    run_latency "live-half-$r" 5s "$LIVE_HALF"
  done
fi
if [[ $DIAGNOSE == 1 ]]; then
  run_latency diagnostic-checkpoints-1h 1h "$RATE"
  run_latency diagnostic-half-of-rate 5s $((RATE / 2))
fi

# --------------------------------------------------------------- summary --
"$BENCH" summarize "$RESULTS" | tee "$OUT/summary.json" | jq . 2>/dev/null || cat "$OUT/summary.json"
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
say "results: $RESULTS, $OUT/summary.json, $OUT/machine.txt"
