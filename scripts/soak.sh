#!/usr/bin/env bash
# Soak test: one `quotaflow serve` answering synchronous checks and
# consuming a Kafka stream at the same time, for a bounded time, with key
# churn; asserts that memory, errors, stream lag and check latency stay flat.
# Loopback only. Not part of scripts/test.sh (it takes ~12 minutes).
#
#   scripts/soak.sh                   # 10 minutes at half the measured maximum
#   SOAK_SECS=60 scripts/soak.sh      # a short run while developing
#
# 1. starts Kafka and Redis (scripts/services.sh up; idempotent), builds the
#    release binary and scripts/bench/loadgen;
# 2. maximum of the mix: a `quotaflow serve` of its own (config
#    scripts/bench/soak/soak.toml) takes both loads at full speed together
#    for MAX_SECS: loadgen closed loop on POST /check, and
#    `quotaflow simulate --kafka --rate 0` into a fresh requests topic. The
#    sync maximum is loadgen's answered rate; the stream maximum is the lower
#    of what simulate published and what quotaflow consumed in that time.
#    That server is then stopped, so the soak starts from a fresh process
#    whose memory the measurement did not inflate. Skipped when SYNC_RATE
#    and STREAM_RATE are both given;
# 3. the soak: a fresh server, group, Redis prefix and topic; SOAK_SECS of
#    loadgen at SYNC_RATE (open loop, latency from each request's due time,
#    one report per SAMPLE_SECS slice) and simulate at STREAM_RATE, both half
#    the maximum unless given. Key churn: loadgen's SYNC_USERS users are a
#    window moving SYNC_CHURN users a second (users never come back), and
#    1 check in 20 is from a hot user, replaced SYNC_HOT_CHURN times a second
#    (it breaches, then goes idle with its breach open);
#    simulate draws from STREAM_USERS users, far more than it reaches within
#    a key's lifetime, so nearly every event finds its keys expired and
#    creates them anew. soak.toml's windows are 10 s at most and it sweeps
#    every second, so idle keys expire all the time;
# 4. every SAMPLE_SECS: quotaflow's RSS (VmRSS), quotaflow_keys_tracked,
#    keys_expired_total, the sum of quotaflow_partition_lag, events
#    consumed, dead letters, checkpoint failures, ERROR log lines, CPU idle;
# 5. stops everything it started (also on error or Ctrl-C), deletes its
#    topics and Redis keys (KEEP=1 keeps them), and runs
#    scripts/bench/soak/report.py: soak.csv, soak.svg, summary.txt, and
#    PASS/FAIL per check (thresholds in that file); exits 1 on any FAIL.
#
# Environment (all optional):
#   SOAK_SECS=600  SAMPLE_SECS=10  MAX_SECS=20
#   WARMUP_SECS    not judged at the start (default: SOAK_SECS/6, at most 60)
#   SYNC_RATE=<req/s> STREAM_RATE=<events/s>  both: skip step 2
#   SYNC_USERS=10000  SYNC_CHURN=500  SYNC_HOT_CHURN=1  CONNECTIONS=32
#   STREAM_USERS=1000000  STREAM_HOT_USERS=3  PARTITIONS=4
#   NICE=0         nice level of quotaflow and the load tools
#   SKIP_BUILD=1   use the release binary as it is
#   KEEP=1         keep topics and Redis keys
# Results: target/soak/ (under CARGO_TARGET_DIR when set). See
# docs/benchmarks.md, "Soak — scripts/soak.sh".
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECS="${SOAK_SECS:-600}"
SAMPLE_SECS="${SAMPLE_SECS:-10}"
MAX_SECS="${MAX_SECS:-20}"
SYNC_USERS="${SYNC_USERS:-10000}"
SYNC_CHURN="${SYNC_CHURN:-500}"
SYNC_HOT_CHURN="${SYNC_HOT_CHURN:-1}"
CONNECTIONS="${CONNECTIONS:-32}"
STREAM_USERS="${STREAM_USERS:-1000000}"
STREAM_HOT_USERS="${STREAM_HOT_USERS:-3}"
PARTITIONS="${PARTITIONS:-4}"
NICE="${NICE:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP="${KEEP:-0}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OUT="${TARGET_DIR}/soak"
CONFIG="scripts/bench/soak/soak.toml"
RUN="soak-$(date +%s)-$$"

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'soak: %s\n' "$*" >&2
  exit 1
}

case "$SOAK_SECS$SAMPLE_SECS$MAX_SECS$SYNC_USERS$SYNC_CHURN$SYNC_HOT_CHURN$CONNECTIONS$STREAM_USERS$STREAM_HOT_USERS$PARTITIONS${SYNC_RATE:-0}${STREAM_RATE:-0}${WARMUP_SECS:-0}" in
  *[!0-9]*) die "SOAK_SECS, SAMPLE_SECS, MAX_SECS, WARMUP_SECS, *_USERS, SYNC_CHURN, CONNECTIONS, PARTITIONS and the rates must be integers" ;;
esac
case "$NICE" in
  -[0-9] | -1[0-9] | [0-9] | 1[0-9]) ;;
  *) die "NICE must be an integer between -19 and 19" ;;
esac
((SAMPLE_SECS >= 1 && SOAK_SECS >= 6 * SAMPLE_SECS && SOAK_SECS <= 86400)) ||
  die "need SAMPLE_SECS >= 1 and 6 samples at least: SOAK_SECS >= 6 * SAMPLE_SECS (and <= 86400)"
((MAX_SECS >= 5 && SYNC_USERS >= 1 && PARTITIONS >= 1)) || die "need MAX_SECS >= 5, SYNC_USERS >= 1, PARTITIONS >= 1"
if [[ -z ${WARMUP_SECS:-} ]]; then
  WARMUP_SECS=$((SOAK_SECS / 6 > 60 ? 60 : SOAK_SECS / 6))
fi
((WARMUP_SECS < SOAK_SECS / 2)) || die "WARMUP_SECS must be under half of SOAK_SECS"
if [[ -n ${SYNC_RATE:-}${STREAM_RATE:-} && (-z ${SYNC_RATE:-} || -z ${STREAM_RATE:-}) ]]; then
  die "give both SYNC_RATE and STREAM_RATE, or neither (then they are measured)"
fi
[[ ${SYNC_RATE:-1} != 0 && ${STREAM_RATE:-1} != 0 ]] || die "SYNC_RATE and STREAM_RATE must be above 0"

# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh

PIDS=() # every process this script started and has not yet stopped

forget_pid() {
  local p keep=()
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# Stop one process we started: TERM (quotaflow drains and writes its last
# checkpoints), KILL after 60 s.
stop_pid() {
  local pid=$1 i
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid did not stop within 60 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ $KEEP != 1 && -n ${KAFKA_BOOTSTRAP_SERVERS:-} ]]; then
    # One pattern for every topic of this run (TopicCommand takes a regex).
    kafka_topics --delete --if-exists --topic "$RUN-.*" >/dev/null 2>&1 || true
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

# Kafka's TopicCommand: quotaflow never creates its requests topic, and an
# auto-created one would have a single partition.
kafka_topics() {
  timeout 120 java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile=scripts/services/tools-log4j2.xml -cp "$KAFKA_CP" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" "$@"
}

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.stderr "$OUT"/*.json "$OUT"/*.jsonl "$OUT"/*.tsv "$OUT"/*.txt "$OUT"/soak.csv "$OUT"/soak.svg

say "starting Kafka and Redis (scripts/services.sh up)"
env_lines=$(scripts/services.sh up) || die "scripts/services.sh up failed"
eval "$env_lines"
[[ $KAFKA_BOOTSTRAP_SERVERS == 127.0.0.1:* && $REDIS_URL == redis://127.0.0.1:* ]] ||
  die "expected loopback services, got $KAFKA_BOOTSTRAP_SERVERS and $REDIS_URL"
KAFKA_CP=$(scripts/services.sh classpath)

if [[ $SKIP_BUILD != 1 ]]; then
  # Low priority: on a shared machine the build is the others' time too.
  say "cargo build --release --bin quotaflow"
  nice -n 10 cargo build --release --bin quotaflow >"$OUT/build.log" 2>&1 ||
    die "cargo build failed (see $OUT/build.log)"
fi
QUOTAFLOW="$TARGET_DIR/release/quotaflow"
[[ -x $QUOTAFLOW ]] || die "$QUOTAFLOW was not built"
GO="$(command -v go || echo /usr/local/go/bin/go)"
[[ -x $GO ]] || die "go is needed for scripts/bench/loadgen (scripts/bench-http.sh installs it)"
LOADGEN="$(cd "$OUT" && pwd)/loadgen"
(cd scripts/bench/loadgen && GOTOOLCHAIN=local "$GO" build -o "$LOADGEN" .) || die "go build of loadgen failed"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
  echo "nproc: $(nproc)"
  echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "busiest processes at start:"
  ps -eo pcpu,comm --sort=-pcpu | head -n 8
} >"$OUT/machine.txt"
IDLE_BEFORE=$(idle_pct)
say "machine: $(nproc) cores, CPU idle ${IDLE_BEFORE}% before the run (other work on it skews every figure)"

# Start `quotaflow serve` for run part NAME (its group, Redis prefix and
# topics NAME-*), after creating NAME-requests; sets QF_PID, QF_ADDR, QF_LOG.
start_quotaflow() {
  local name=$1 i
  kafka_topics --create --if-not-exists --topic "$name-requests" --partitions "$PARTITIONS" \
    --replication-factor 1 >/dev/null || die "creating topic $name-requests failed"
  QF_LOG="$OUT/$name.log"
  # The soak config is the whole configuration: drop the caller's QUOTAFLOW__*.
  (
    while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^QUOTAFLOW__' || true)
    export QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" \
      QUOTAFLOW__REDIS__URL="$REDIS_URL" \
      QUOTAFLOW__KAFKA__GROUP_ID="$name" \
      QUOTAFLOW__REDIS__KEY_PREFIX="$name" \
      QUOTAFLOW__KAFKA__REQUESTS_TOPIC="$name-requests" \
      QUOTAFLOW__KAFKA__DECISIONS_TOPIC="$name-decisions" \
      QUOTAFLOW__KAFKA__ALERTS_TOPIC="$name-alerts" \
      QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC="$name-dlq" \
      QUOTAFLOW__KAFKA__CONFIG_TOPIC="$name-config"
    exec nice -n "$NICE" "$QUOTAFLOW" serve --config "$CONFIG" --listen 127.0.0.1:0 >"$QF_LOG" 2>"$QF_LOG.stderr"
  ) &
  QF_PID=$!
  PIDS+=("$QF_PID")
  QF_ADDR=""
  for ((i = 0; i < 300; i++)); do
    QF_ADDR=$(grep -m1 '"event":"listening"' "$QF_LOG" 2>/dev/null | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true)
    [[ -n $QF_ADDR ]] && break
    kill -0 "$QF_PID" 2>/dev/null || die "quotaflow exited at start; see $QF_LOG.stderr"
    sleep 0.1
  done
  [[ $QF_ADDR == 127.0.0.1:* ]] || die "quotaflow did not log its listening address within 30 s; see $QF_LOG"
  for ((i = 0; i < 600; i++)); do
    [[ $(scrape_value partitions_owned) -ge $PARTITIONS ]] && return 0
    sleep 0.1
  done
  die "quotaflow at $QF_ADDR did not own all $PARTITIONS partitions within 60 s"
}

stop_quotaflow() {
  stop_pid "$QF_PID"
  forget_pid "$QF_PID"
}

# Sum of metric quotaflow_$1 (all its labels) in /metrics now, 0 if absent.
scrape_value() {
  curl -s --max-time 5 "http://$QF_ADDR/metrics" | metric_sum "$1"
}
metric_sum() {
  awk -v m="quotaflow_$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f", s }'
}

# The load tools, started with & only: exec, so that $! is the tool's own pid
# (the one cleanup stops), not that of a subshell around it.
# quotaflow simulate publishing to NAME-requests at RATE for SECS (0: full speed).
simulate() {
  local name=$1 rate=$2 secs=$3
  exec nice -n "$NICE" "$QUOTAFLOW" simulate --config "$CONFIG" --kafka "$KAFKA_BOOTSTRAP_SERVERS" \
    --topic "$name-requests" --rate "$rate" --duration "${secs}s" --users "$STREAM_USERS" \
    --hot-users "$STREAM_HOT_USERS" --seed "$$"
}

loadgen() {
  exec nice -n "$NICE" "$LOADGEN" -addr "$QF_ADDR" -conns "$CONNECTIONS" -users "$SYNC_USERS" \
    -churn "$SYNC_CHURN" -hot-churn "$SYNC_HOT_CHURN" "$@"
}

now() { date +%s.%N; }
sleep_until() { sleep "$(awk -v t="$1" -v n="$(now)" 'BEGIN { d = t - n; printf "%.3f", (d > 0) ? d : 0 }')"; }

# ------------------------------------------------------------ 2. maximum --
if [[ -n ${SYNC_RATE:-} ]]; then
  RATES_FROM="given (SYNC_RATE, STREAM_RATE)"
  SYNC_MAX=0 STREAM_MAX=0 PUBLISHED_MAX=0 CONSUMED_MAX=0
else
  say "maximum of the mix: ${MAX_SECS} s of loadgen (closed loop, $CONNECTIONS connections) and simulate --rate 0 together"
  start_quotaflow "$RUN-max"
  c0=$(scrape_value events_consumed_total)
  t0=$(now)
  loadgen -rate 0 -duration "${MAX_SECS}s" -json "$OUT/max-sync.json" >"$OUT/max-sync.txt" &
  lg=$!
  PIDS+=("$lg")
  simulate "$RUN-max" 0 "$MAX_SECS" >"$OUT/max-stream.json" 2>"$OUT/max-simulate.log" &
  sim=$!
  PIDS+=("$sim")
  sleep_until "$(awk -v t="$t0" -v d="$MAX_SECS" 'BEGIN { printf "%.3f", t + d }')"
  c1=$(scrape_value events_consumed_total)
  t1=$(now)
  wait "$lg" || die "loadgen failed in the maximum phase (see $OUT/max-sync.txt)"
  wait "$sim" || die "simulate failed in the maximum phase (see $OUT/max-simulate.log)"
  forget_pid "$lg"
  forget_pid "$sim"
  stop_quotaflow
  SYNC_MAX=$(jq -r '.throughput | floor' "$OUT/max-sync.json")
  # simulate logs JSON to stdout too; its result is the line with "published".
  PUBLISHED_MAX=$(grep '"published"' "$OUT/max-stream.json" | jq -r --argjson s "$MAX_SECS" '.published / $s | floor')
  # Over the time between the two scrapes, which a busy server may stretch.
  CONSUMED_MAX=$(awk -v c="$((c1 - c0))" -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", c / (b - a) }')
  say "consumed $((c1 - c0)) events in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
  STREAM_MAX=$((PUBLISHED_MAX < CONSUMED_MAX ? PUBLISHED_MAX : CONSUMED_MAX))
  ((SYNC_MAX > 0 && STREAM_MAX > 0)) || die "no throughput measured (sync $SYNC_MAX/s, stream $STREAM_MAX/s)"
  SYNC_RATE=$((SYNC_MAX / 2))
  STREAM_RATE=$((STREAM_MAX / 2))
  RATES_FROM="measured: half the maximum of the mix (${MAX_SECS} s of both at full speed together)"
  say "maximum of the mix: sync ${SYNC_MAX} checks/s; stream ${STREAM_MAX} events/s (published ${PUBLISHED_MAX}/s, consumed ${CONSUMED_MAX}/s)"
fi
say "rates: sync ${SYNC_RATE} checks/s, stream ${STREAM_RATE} events/s; ${RATES_FROM}"

# --------------------------------------------------------------- 3. soak --
NAME="$RUN-soak"
say "soak: ${SOAK_SECS} s, samples every ${SAMPLE_SECS} s, first ${WARMUP_SECS} s not judged (group and topics $NAME-*)"
start_quotaflow "$NAME"
SAMPLES="$OUT/samples.tsv"
printf 't_s\trss_kib\tkeys_tracked\tkeys_expired\tlag\tevents_consumed\tdead_letters\tcheckpoint_failures\terror_lines\twarn_lines\tidle_pct\n' >"$SAMPLES"
CPU_START=$(cpu_secs "$QF_PID")
T0=$(now)
loadgen -rate "$SYNC_RATE" -duration "${SOAK_SECS}s" -interval "${SAMPLE_SECS}s" \
  -slices "$OUT/slices.jsonl" -json "$OUT/sync.json" >"$OUT/sync.txt" 2>&1 &
LG=$!
PIDS+=("$LG")
simulate "$NAME" "$STREAM_RATE" "$SOAK_SECS" >"$OUT/stream.json" 2>"$OUT/simulate.log" &
SIM=$!
PIDS+=("$SIM")

stat0=$(head -1 /proc/stat)
for ((k = 1; k * SAMPLE_SECS <= SOAK_SECS; k++)); do
  sleep_until "$(awk -v t="$T0" -v d=$((k * SAMPLE_SECS)) 'BEGIN { printf "%.3f", t + d }')"
  kill -0 "$QF_PID" 2>/dev/null || {
    say "quotaflow exited during the soak (see $QF_LOG.stderr)"
    break
  }
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$QF_PID/status")
  curl -s --max-time 5 "http://$QF_ADDR/metrics" >"$OUT/metrics.txt" || : >"$OUT/metrics.txt"
  stat1=$(head -1 /proc/stat)
  idle=$(awk -v a="$stat0" -v b="$stat1" 'BEGIN { n = split(a, x, " "); split(b, y, " "); t = 0
    for (i = 2; i <= n; i++) t += y[i] - x[i]; printf "%d", (t > 0) ? 100 * (y[5] - x[5] + y[6] - x[6]) / t : 0 }')
  stat0=$stat1
  row=("$((k * SAMPLE_SECS))" "$rss")
  for m in keys_tracked keys_expired_total partition_lag events_consumed_total dead_letters_total checkpoint_failures_total; do
    row+=("$(metric_sum "$m" <"$OUT/metrics.txt")")
  done
  row+=("$(grep -c '"level":"ERROR"' "$QF_LOG" || true)" "$(grep -c '"level":"WARN"' "$QF_LOG" || true)" "$idle")
  (IFS=$'\t' && echo "${row[*]}") >>"$SAMPLES"
  say "$(printf 't=%4ss  RSS %6.1f MiB  keys %7s  expired %9s  lag %6s  consumed %10s  idle %3s%%' \
    "${row[0]}" "$(awk -v r="$rss" 'BEGIN { print r / 1024 }')" "${row[2]}" "${row[3]}" "${row[4]}" "${row[5]}" "$idle")"
done

SYNC_RC=0 SIM_RC=0
wait "$LG" || SYNC_RC=$?
wait "$SIM" || SIM_RC=$?
forget_pid "$LG"
forget_pid "$SIM"
CPU_END=$(cpu_secs "$QF_PID" 2>/dev/null || echo "$CPU_START")
ALIVE=0
kill -0 "$QF_PID" 2>/dev/null && ALIVE=1
stop_quotaflow
QF_RC=0
# stop_pid reaped it; a second wait gives 127, so read the status from the log.
grep -q '"event":"stopped"' "$QF_LOG" || QF_RC=1
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"

jq -n \
  --arg run "$RUN" --arg rates_from "$RATES_FROM" --arg date "$(date -u +%FT%TZ)" \
  --argjson soak_secs "$SOAK_SECS" --argjson sample_secs "$SAMPLE_SECS" --argjson warmup_secs "$WARMUP_SECS" \
  --argjson max_secs "$MAX_SECS" --argjson sync_max "$SYNC_MAX" --argjson stream_max "$STREAM_MAX" \
  --argjson published_max "$PUBLISHED_MAX" --argjson consumed_max "$CONSUMED_MAX" \
  --argjson sync_rate "$SYNC_RATE" --argjson stream_rate "$STREAM_RATE" \
  --argjson sync_users "$SYNC_USERS" --argjson sync_churn "$SYNC_CHURN" --argjson sync_hot_churn "$SYNC_HOT_CHURN" \
  --argjson stream_users "$STREAM_USERS" --argjson stream_hot_users "$STREAM_HOT_USERS" \
  --argjson loadgen_rc "$SYNC_RC" --argjson simulate_rc "$SIM_RC" --argjson alive "$ALIVE" --argjson stopped_clean "$((1 - QF_RC))" \
  --argjson error_lines "$(grep -c '"level":"ERROR"' "$QF_LOG" || true)" \
  --argjson panics "$(grep -c 'panicked' "$QF_LOG.stderr" || true)" \
  --argjson cpu_secs "$(awk -v a="$CPU_START" -v b="$CPU_END" 'BEGIN { printf "%.2f", b - a }')" \
  --argjson idle_before "$IDLE_BEFORE" \
  '$ARGS.named' >"$OUT/run.json"

say "report"
python3 scripts/bench/soak/report.py "$OUT"
