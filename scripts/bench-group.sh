#!/usr/bin/env bash
# Kafka-mode group: a check decided by this instance (local) against one it
# forwards to the owner of the user's partition (remote), and the embedded
# mode as today's reference, at one fixed open-loop rate, loopback only.
#
#   scripts/bench-group.sh
#
# 1. starts Kafka and Redis (scripts/services.sh up; idempotent), builds the
#    release binary and scripts/bench/loadgen; creates this run's topics
#    (requests with 2 partitions; decisions, alerts, dead letters) with
#    Kafka's TopicCommand, as scripts/soak.sh does;
# 2. starts two instances A and B of `quotaflow serve --config
#    scripts/bench/group.toml` in Kafka mode (one group, one Redis key
#    prefix, each its own HTTP port and internal listener on 127.0.0.1:0)
#    and waits until the owner registry in Redis
#    ({prefix}:{group}:{topic}:owners) shows each owning one partition;
#    starts E, the same config in embedded mode (no Kafka);
# 3. ROUNDS rounds, the order of the cases alternating, each case DURATION
#    seconds at RATE checks/s (loadgen, open loop, latency from each
#    request's due time, 10,000 users, no hot user):
#      L  loadgen -> A, users homed on A's partition (decided in A);
#      R  loadgen -> A, users homed on B's partition (forwarded to B over
#         POST /internal/v1/decide);
#      E  loadgen -> E (embedded mode), all users;
#    then L and E at each of EXTRA_RATES, to separate the fixed
#    per-request cost of waking the server from the cost of a check;
#    for every case p50/p99/max (loadgen), server CPU per check of A alone
#    and of A + B (/proc/PID/stat deltas), and A's
#    quotaflow_owner_calls_total delta (R must forward every check, L none);
#    and, before the rounds, each server's CPU while idle (ms per second:
#    the Kafka consumer, the registry, the checkpointer), which is part of
#    every per-check figure (at 3,000/s, 3 ms/s is 1 µs a check);
# 4. prints the summary (medians of the rounds, the targets' ratios) and
#    stops what it started, by pid (also on error or Ctrl-C); deletes its
#    topics and Redis keys unless KEEP=1.
#
# The per-user limit is aligned (keyed by the partition key, user_id), so
# each check has exactly one home: local or remote, never both.
#
# Environment (all optional):
#   DURATION=20  RATE=3000  ROUNDS=3  USERS=10000
#   EXTRA_RATES="10000"  L and E also at these rates ("": none)
#   CONNECTIONS=32  WARMUP=3 (seconds of each case before the rounds)
#   NICE=-10    run quotaflow and loadgen at this nice level (negative needs
#               root); with sched_autogroup_enabled the level is also set on
#               this script's session, as scripts/bench-stream.sh does
#   KEEP=1      keep topics and Redis keys
#   SYNC_HITS=checkpointed  cluster.sync_hits of A and B: "checkpointed"
#               (the default: answered at once) or "logged" (a hit is
#               answered once it is in its partition's log; docs/group.md)
#   SERVER_THREADS=N  a diagnostic: the servers' tokio worker threads
#               (TOKIO_WORKER_THREADS; default: one per core)
#   PERF=1      also count each server's context switches per check
#               (`perf stat -e context-switches -p PID` over each case)
# Results: target/bench-group/ (under CARGO_TARGET_DIR when set):
# results.tsv (one line per case and round), summary.md, each run's JSON,
# the servers' logs, machine.txt. See docs/benchmarks.md (section 9).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-20}"
RATE="${RATE:-3000}"
ROUNDS="${ROUNDS:-3}"
EXTRA_RATES="${EXTRA_RATES-10000}"
SERVER_THREADS="${SERVER_THREADS:-}"
SYNC_HITS="${SYNC_HITS:-checkpointed}"
PERF="${PERF:-0}"
USERS="${USERS:-10000}"
CONNECTIONS="${CONNECTIONS:-32}"
WARMUP="${WARMUP:-3}"
NICE="${NICE:-0}"
KEEP="${KEEP:-0}"
PARTITIONS=2
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
OUT="${TARGET_DIR}/bench-group"
RUN="qfgroup-$(date +%s)-$$"
CONFIG="scripts/bench/group.toml"
# Targets (docs/benchmarks.md, section 9).
TARGET_EXTRA_P99_MS=0.5
TARGET_P99_MS=1
TARGET_CPU_US=20
TARGET_CPU_RATIO=2

say() { printf '==> %s\n' "$*" >&2; }
case "$SYNC_HITS" in logged | checkpointed) ;; *)
  printf 'SYNC_HITS must be logged or checkpointed, not %s\n' "$SYNC_HITS" >&2
  exit 2
  ;;
esac
die() {
  printf 'bench-group: %s\n' "$*" >&2
  exit 1
}

case "$DURATION$RATE$ROUNDS$USERS$CONNECTIONS$WARMUP$SERVER_THREADS${EXTRA_RATES// /}" in
  *[!0-9]*) die "DURATION, RATE, ROUNDS, USERS, CONNECTIONS, WARMUP, SERVER_THREADS and EXTRA_RATES must be integers" ;;
esac
case "$NICE" in
  -[0-9] | -1[0-9] | [0-9] | 1[0-9]) ;;
  *) die "NICE must be an integer between -19 and 19" ;;
esac
((DURATION >= 1 && DURATION <= 300)) || die "DURATION must be 1..300 seconds"
((RATE >= 1 && ROUNDS >= 1)) || die "RATE and ROUNDS must be at least 1"
# shellcheck source=scripts/bench/lib.sh
. scripts/bench/lib.sh

PIDS=() # quotaflow processes this script started

# Stop one process we started: TERM (it hands its partitions back and
# writes final checkpoints), KILL after 60 s.
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

# Kafka's TopicCommand (as scripts/soak.sh): quotaflow never creates its
# requests topic, and an auto-created one would have a single partition.
kafka_topics() {
  timeout 120 java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile=scripts/services/tools-log4j2.xml -cp "$KAFKA_CP" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" "$@"
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [[ -n ${AUTOGROUP:-} ]]; then echo "${AUTOGROUP_BEFORE:-0}" 2>/dev/null >/proc/self/autogroup || true; fi
  if [[ $KEEP != 1 && -n ${KAFKA_CP:-} ]]; then
    kafka_topics --delete --if-exists --topic "$RUN-.*" >/dev/null 2>&1 || true
    if [[ -n ${REDIS_URL:-} ]]; then
      timeout 60 redis-cli -u "$REDIS_URL" --scan --pattern "$RUN*" 2>/dev/null |
        timeout 60 xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.stderr "$OUT"/*.json "$OUT"/*.txt "$OUT"/*.tsv "$OUT"/*.md "$OUT"/*.perf-*

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

# ---------------------------------------------------------------- setup
command -v jq >/dev/null || apt_install jq
command -v curl >/dev/null || apt_install curl
command -v python3 >/dev/null || apt_install python3
if [[ $PERF == 1 ]] && ! command -v perf >/dev/null; then die "PERF=1 needs perf"; fi
say "starting Kafka and Redis (scripts/services.sh up)"
env_lines=$(scripts/services.sh up) || die "scripts/services.sh up failed"
eval "$env_lines"
[[ $KAFKA_BOOTSTRAP_SERVERS == 127.0.0.1:* && $REDIS_URL == redis://127.0.0.1:* ]] ||
  die "expected loopback services, got $KAFKA_BOOTSTRAP_SERVERS and $REDIS_URL"
KAFKA_CP=$(scripts/services.sh classpath)

say "cargo build --release --bin quotaflow"
nice -n 10 cargo build --release --bin quotaflow >"$OUT/build.log" 2>&1 ||
  die "cargo build failed (see $OUT/build.log)"
QUOTAFLOW="$TARGET_DIR/release/quotaflow"
[[ -x $QUOTAFLOW ]] || die "$QUOTAFLOW was not built"
GO="$(command -v go || echo /usr/local/go/bin/go)"
[[ -x $GO ]] || die "go is needed for scripts/bench/loadgen (scripts/bench-http.sh installs it)"
LOADGEN="$(cd "$OUT" && pwd)/loadgen"
(cd scripts/bench/loadgen && GOTOOLCHAIN=local "$GO" build -o "$LOADGEN" .) || die "go build of loadgen failed"

say "creating topics $RUN-{requests ($PARTITIONS partitions),decisions,alerts,dlq}"
kafka_topics --create --if-not-exists --topic "$RUN-requests" --partitions "$PARTITIONS" \
  --replication-factor 1 >/dev/null &
t1=$!
for t in decisions alerts dlq; do
  kafka_topics --create --if-not-exists --topic "$RUN-$t" --partitions 1 --replication-factor 1 >/dev/null &
done
wait "$t1" || die "creating topic $RUN-requests failed"
wait || true

# Start `quotaflow serve` as NAME (kafka: in the run's group; embedded: no
# Kafka); sets QF_PID and QF_ADDR, and QF_INTERNAL in Kafka mode.
start_quotaflow() {
  local name=$1 mode=$2 log="$OUT/$1.log" i
  (
    while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^QUOTAFLOW__\|^TOKIO_WORKER_THREADS$' || true)
    [[ -z $SERVER_THREADS ]] || export TOKIO_WORKER_THREADS="$SERVER_THREADS"
    if [[ $mode == kafka ]]; then
      export QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" \
        QUOTAFLOW__REDIS__URL="$REDIS_URL" \
        QUOTAFLOW__KAFKA__GROUP_ID="$RUN" \
        QUOTAFLOW__REDIS__KEY_PREFIX="$RUN" \
        QUOTAFLOW__KAFKA__REQUESTS_TOPIC="$RUN-requests" \
        QUOTAFLOW__KAFKA__DECISIONS_TOPIC="$RUN-decisions" \
        QUOTAFLOW__KAFKA__ALERTS_TOPIC="$RUN-alerts" \
        QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC="$RUN-dlq" \
        QUOTAFLOW__CLUSTER__SYNC_HITS="$SYNC_HITS"
    fi
    exec nice -n "$NICE" "$QUOTAFLOW" serve --config "$CONFIG" --listen 127.0.0.1:0 >"$log" 2>"$log.stderr"
  ) &
  QF_PID=$!
  PIDS+=("$QF_PID")
  QF_ADDR=""
  QF_INTERNAL=""
  for ((i = 0; i < 300; i++)); do
    QF_ADDR=$(grep -m1 '"event":"listening"' "$log" 2>/dev/null | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true)
    [[ -n $QF_ADDR ]] && break
    kill -0 "$QF_PID" 2>/dev/null || die "quotaflow $name exited at start; see $log.stderr"
    sleep 0.1
  done
  [[ $QF_ADDR == 127.0.0.1:* ]] || die "quotaflow $name did not log its listening address within 30 s; see $log"
  grep -m1 '"event":"listening"' "$log" | grep -q "\"mode\":\"$mode\"" ||
    say "warning: $name's listening line does not say mode $mode: $(grep -m1 '"event":"listening"' "$log")"
  if [[ $mode == kafka ]]; then
    QF_INTERNAL=$(grep -m1 '"event":"cluster_listening"' "$log" | sed -n 's/.*"address":"\([^"]*\)".*/\1/p' || true)
    [[ -n $QF_INTERNAL ]] || die "quotaflow $name logged no cluster_listening address; see $log"
  fi
}

REGISTRY_KEY="$RUN:$RUN:$RUN-requests:owners"
# The registry as "partition address" lines.
registry() {
  redis-cli -u "$REDIS_URL" --raw HGETALL "$REGISTRY_KEY" 2>/dev/null | paste - - | awk 'NF == 3 {print $1, $3}'
}

# Sum of metric quotaflow_$1 (all its labels) at ADDR $2.
scrape() {
  curl -s --max-time 5 "http://$2/metrics" |
    awk -v m="quotaflow_$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f", s }'
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo n/a)$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
  echo "nproc: $(nproc)"
  echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
  echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "NICE: $NICE; autogroup: ${AUTOGROUP:-unchanged}; server threads: ${SERVER_THREADS:-one per core}; cluster.sync_hits: $SYNC_HITS"
  echo "kafka: $(scripts/services.sh status 2>/dev/null | head -n1)"
  echo "busiest processes at start:"
  ps -eo pcpu,comm --sort=-pcpu | head -n 8
} >"$OUT/machine.txt"

say "starting A and B (Kafka mode, group $RUN) and E (embedded)"
start_quotaflow A kafka
A_PID=$QF_PID A_ADDR=$QF_ADDR A_INTERNAL=$QF_INTERNAL
start_quotaflow B kafka
B_PID=$QF_PID B_ADDR=$QF_ADDR B_INTERNAL=$QF_INTERNAL
start_quotaflow E embedded
E_PID=$QF_PID E_ADDR=$QF_ADDR
say "A: $A_ADDR (internal $A_INTERNAL), B: $B_ADDR (internal $B_INTERNAL), E: $E_ADDR"

say "waiting until the registry ($REGISTRY_KEY) shows A and B owning one partition each"
P_A="" P_B=""
for ((i = 0; i < 1200; i++)); do
  reg=$(registry)
  P_A=$(awk -v a="$A_INTERNAL" '$2 == a {print $1}' <<<"$reg")
  P_B=$(awk -v a="$B_INTERNAL" '$2 == a {print $1}' <<<"$reg")
  if [[ $P_A =~ ^[0-9]+$ && $P_B =~ ^[0-9]+$ && $(wc -l <<<"$reg") -eq $PARTITIONS ]]; then
    break
  fi
  P_A="" P_B=""
  sleep 0.1
done
[[ -n $P_A && -n $P_B ]] || die "partitions not spread over A and B in 120 s; registry: $(registry | tr '\n' ';')"
# Every member re-reads the registry each registry_interval (200 ms).
sleep 1
printf '%s\n' "$reg" >"$OUT/registry.txt"
say "registry: partition $P_A -> A ($A_INTERNAL), partition $P_B -> B ($B_INTERNAL)"

# A first check of each kind, by hand: both answered 200.
first_check() {
  curl -sf -X POST -H 'Content-Type: application/json' \
    -d "{\"user_id\":\"$2\",\"method\":\"GET\",\"path\":\"/orders\"}" "http://$1/check" >/dev/null ||
    die "a first POST /check to $1 failed"
}
first_check "$A_ADDR" warmup
first_check "$E_ADDR" warmup

# ---------------------------------------------------------------- cases
RESULTS="$OUT/results.tsv"
printf 'case\tround\trate\trequests\tp50_ms\tp99_ms\tmax_ms\tservice_p50_ms\tservice_p99_ms\tsend_lag_p99_ms\tcpu_a_us\tcpu_b_us\tcpu_ab_us\tcpu_e_us\towner_calls\tdegraded\tstatuses\terrors\tcs_a\tcs_b\tcs_e\n' >"$RESULTS"

# run_case CASE ROUND RATE SECONDS [record]: one loadgen run, CPU deltas
# of A, B and E, A's owner-call delta; appends a line to results.tsv when
# record is set.
run_case() {
  local c=$1 round=$2 rate=$3 secs=$4 record=${5:-} addr args=() json
  case $c in
    L) addr=$A_ADDR args=(-partitions "$PARTITIONS" -only "$P_A") ;;
    R) addr=$A_ADDR args=(-partitions "$PARTITIONS" -only "$P_B") ;;
    E) addr=$E_ADDR ;;
    *) die "unknown case $c" ;;
  esac
  json="$OUT/$c-$rate-$round.json"
  local calls0 deg0 a0 b0 e0 a1 b1 e1 calls1 deg1
  calls0=$(scrape owner_calls_total "$A_ADDR")
  deg0=$(scrape degraded_answers_total "$A_ADDR")
  local perfs=() who
  if [[ $PERF == 1 && -n $record ]]; then
    for who in A B E; do
      pid_of="${who}_PID"
      perf stat -x, -e context-switches -p "${!pid_of}" -o "$OUT/$c-$rate-$round.perf-$who" 2>/dev/null &
      perfs+=($!)
    done
  fi
  a0=$(cpu_secs "$A_PID") b0=$(cpu_secs "$B_PID") e0=$(cpu_secs "$E_PID")
  GOGC=off run timeout $((secs + 60)) "$LOADGEN" -addr "$addr" -rate "$rate" -duration "${secs}s" \
    -conns "$CONNECTIONS" -users "$USERS" -hot-every 0 "${args[@]}" -json "$json" >"$OUT/$c-$rate-$round.txt"
  a1=$(cpu_secs "$A_PID") b1=$(cpu_secs "$B_PID") e1=$(cpu_secs "$E_PID")
  for who in "${perfs[@]}"; do kill -INT "$who" 2>/dev/null || true; done
  for who in "${perfs[@]}"; do wait "$who" 2>/dev/null || true; done
  calls1=$(scrape owner_calls_total "$A_ADDR")
  deg1=$(scrape degraded_answers_total "$A_ADDR")
  [[ -n $record ]] || return 0
  local n cs=()
  n=$(jq -r '.requests' "$json")
  for who in A B E; do
    [[ $PERF == 1 ]] || { cs+=(n/a); continue; }
    # Context switches of the server's threads per check (perf's CSV: value,unit,event,...).
    cs+=("$(awk -F, -v n="$n" '$3 == "context-switches" && $1 ~ /^[0-9]+$/ {printf "%.2f", $1 / n; f = 1} END {if (!f) print "n/a"}' \
      "$OUT/$c-$rate-$round.perf-$who" 2>/dev/null || echo n/a)")
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$round" "$rate" "$n" \
    "$(jq -r '.p50_ms' "$json")" "$(jq -r '.p99_ms' "$json")" "$(jq -r '.max_ms' "$json")" \
    "$(jq -r '.service_p50_ms' "$json")" "$(jq -r '.service_p99_ms' "$json")" "$(jq -r '.send_lag_p99_ms' "$json")" \
    "$(per_req_us "$a0" "$a1" "$n")" "$(per_req_us "$b0" "$b1" "$n")" \
    "$(awk -v a0="$a0" -v a1="$a1" -v b0="$b0" -v b1="$b1" -v n="$n" 'BEGIN {printf "%.1f", (a1 - a0 + b1 - b0) / n * 1e6}')" \
    "$(per_req_us "$e0" "$e1" "$n")" \
    "$((calls1 - calls0))" "$((deg1 - deg0))" \
    "$(jq -r '.status_codes | to_entries | map("\(.key):\(.value)") | join(" ")' "$json")" \
    "$(jq -r '[.errors[]] | add // 0' "$json")" "${cs[@]}" >>"$RESULTS"
  say "$(tail -n1 "$RESULTS" | awk -F'\t' '{printf "%s round %s at %s/s: p50 %s p99 %s max %s ms (service p50 %s p99 %s); CPU/check A %s, A+B %s, E %s us; owner calls %s; degraded %s; %s", $1, $2, $3, $5, $6, $7, $8, $9, $11, $13, $14, $15, $16, $17}')"
}

if ((WARMUP > 0)); then
  say "warm-up: ${WARMUP} s of each case at $RATE/s (not counted)"
  for c in L R E; do run_case "$c" 0 "$RATE" "$WARMUP"; done
fi

# The servers' own CPU while nothing is sent: ms of CPU per second.
a0=$(cpu_secs "$A_PID") b0=$(cpu_secs "$B_PID") e0=$(cpu_secs "$E_PID") t0=$(date +%s.%N)
IDLE_BEFORE="$(idle_pct)"
sleep 3
a1=$(cpu_secs "$A_PID") b1=$(cpu_secs "$B_PID") e1=$(cpu_secs "$E_PID") t1=$(date +%s.%N)
IDLE_CPU=$(awk -v t="$t1" -v s="$t0" -v a="$a1" -v A="$a0" -v b="$b1" -v B="$b0" -v e="$e1" -v E="$e0" \
  'BEGIN {d = t - s; printf "A %.1f, B %.1f, E %.1f", (a - A) / d * 1e3, (b - B) / d * 1e3, (e - E) / d * 1e3}')
say "CPU idle before the rounds: ${IDLE_BEFORE}% (other work on the machine skews every figure); servers' own CPU while idle, ms/s: $IDLE_CPU"
echo "idle before the rounds: ${IDLE_BEFORE}%" >>"$OUT/machine.txt"
echo "servers' CPU while idle (ms/s): $IDLE_CPU" >>"$OUT/machine.txt"

ORDERS=("L R E" "E R L" "R L E" "E L R")
for ((r = 1; r <= ROUNDS; r++)); do
  order=${ORDERS[$(((r - 1) % ${#ORDERS[@]}))]}
  say "round $r of $ROUNDS: $order at $RATE/s, ${DURATION} s each"
  for c in $order; do run_case "$c" "$r" "$RATE" "$DURATION" record; done
  for x in $EXTRA_RATES; do
    for c in $( ((r % 2)) && echo "L E" || echo "E L"); do
      run_case "$c" "$r" "$x" "$DURATION" record
    done
  done
done
IDLE_AFTER="$(idle_pct)"
echo "idle after the rounds: ${IDLE_AFTER}%" >>"$OUT/machine.txt"
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
curl -s --max-time 5 "http://$A_ADDR/metrics" >"$OUT/metrics-A.txt" || true
curl -s --max-time 5 "http://$B_ADDR/metrics" >"$OUT/metrics-B.txt" || true

# ---------------------------------------------------------------- summary
python3 - "$RESULTS" "$RATE" "${EXTRA_RATES:-}" "$IDLE_BEFORE" "$IDLE_AFTER" "$NICE" "$DURATION" "$ROUNDS" \
  "$TARGET_EXTRA_P99_MS" "$TARGET_P99_MS" "$TARGET_CPU_US" "$TARGET_CPU_RATIO" "$P_A" "$P_B" \
  "$IDLE_CPU" "${SERVER_THREADS:-one per core}" <<'EOF' | tee "$OUT/summary.md"
import csv, statistics, sys
(path, rate, extra_rates, idle0, idle1, nice, duration, rounds,
 t_extra, t_p99, t_cpu, t_ratio, p_a, p_b, idle_cpu, threads) = sys.argv[1:]
extra_rates = extra_rates.split()
rows = list(csv.DictReader(open(path), delimiter="\t"))
def med(case, r, field):
    v = [float(x[field]) for x in rows if x["case"] == case and x["rate"] == r and x[field] not in ("", "n/a")]
    return statistics.median(v) if v else float("nan")
def per_round(case, r, field):
    return [x[field] for x in rows if x["case"] == case and x["rate"] == r]
names = {"L": "L: to A, homed on A (local)", "R": "R: to A, homed on B (forwarded)", "E": "E: embedded mode"}
print(f"\n## bench-group summary\n")
print(f"{duration} s per case, {rounds} rounds in alternating order, open loop; medians of the rounds. "
      f"CPU idle before the rounds {idle0}%, after {idle1}%; nice {nice}; server threads: {threads}. "
      f"Partition {p_a} owned by A, {p_b} by B. Servers' own CPU while idle (ms/s): {idle_cpu}.\n")
print("| case | rate/s | p50 ms | p99 ms | max ms | service p50 / p99 ms | send lag p99 ms | CPU µs/check A | CPU µs/check A+B | owner calls (A) | p99 per round |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in [rate] + extra_rates:
    for c in "LRE":
        if not per_round(c, r, "p99_ms"):
            continue
        cpu_a = med(c, r, "cpu_e_us") if c == "E" else med(c, r, "cpu_a_us")
        cpu_ab = "—" if c == "E" else f"{med(c, r, 'cpu_ab_us'):.1f}"
        calls = "—" if c == "E" else "/".join(per_round(c, r, "owner_calls"))
        print(f"| {names[c]} | {int(r):,} | {med(c, r, 'p50_ms'):.3f} | {med(c, r, 'p99_ms'):.3f} | "
              f"{med(c, r, 'max_ms'):.2f} | {med(c, r, 'service_p50_ms'):.3f} / {med(c, r, 'service_p99_ms'):.3f} | "
              f"{med(c, r, 'send_lag_p99_ms'):.2f} | {cpu_a:.1f} | {cpu_ab} | {calls} | "
              f"{' / '.join('%.2f' % float(x) for x in per_round(c, r, 'p99_ms'))} |")
def verdict(ok):
    return "MET" if ok else "MISSED"
extra = med("R", rate, "p99_ms") - med("L", rate, "p99_ms")
rounds_extra = [float(a["p99_ms"]) - float(b["p99_ms"]) for a in rows for b in rows
                if a["case"] == "R" and b["case"] == "L" and a["rate"] == b["rate"] == rate and a["round"] == b["round"]]
l_p99, l_cpu = med("L", rate, "p99_ms"), med("L", rate, "cpu_a_us")
ratio = med("R", rate, "cpu_ab_us") / l_cpu
ratio_ab = med("R", rate, "cpu_ab_us") / med("L", rate, "cpu_ab_us")
print()
print(f"1. forwarded − local at p99: {extra:+.3f} ms (per round {', '.join('%+.3f' % x for x in rounds_extra)}) "
      f"— target ≤ {t_extra} ms: {verdict(extra <= float(t_extra))}")
print(f"   (at p50 {med('R', rate, 'p50_ms') - med('L', rate, 'p50_ms'):+.3f} ms; service time, write to response: "
      f"p50 {med('R', rate, 'service_p50_ms') - med('L', rate, 'service_p50_ms'):+.3f}, "
      f"p99 {med('R', rate, 'service_p99_ms') - med('L', rate, 'service_p99_ms'):+.3f} ms)")
print(f"2. local at {int(rate):,}/s: p99 {l_p99:.3f} ms — target ≤ {t_p99} ms: {verdict(l_p99 <= float(t_p99))}; "
      f"CPU {l_cpu:.1f} µs/check (A) — target ≤ {t_cpu} µs: {verdict(l_cpu <= float(t_cpu))}")
print(f"3. CPU of a forwarded check (A+B) / a local one (A): {ratio:.2f}× "
      f"({med('R', rate, 'cpu_ab_us'):.1f} / {l_cpu:.1f} µs; against L's A+B, {ratio_ab:.2f}×) "
      f"— target ≤ {t_ratio}×: {verdict(ratio <= float(t_ratio))}")
e_p99, e_cpu = med("E", rate, "p99_ms"), med("E", rate, "cpu_e_us")
print(f"   reference: embedded mode at {int(rate):,}/s p99 {e_p99:.3f} ms, {e_cpu:.1f} µs/check")
for x in extra_rates:
    print(f"   at {int(x):,}/s: L {med('L', x, 'cpu_a_us'):.1f} µs/check (p99 {med('L', x, 'p99_ms'):.3f} ms), "
          f"E {med('E', x, 'cpu_e_us'):.1f} µs/check (p99 {med('E', x, 'p99_ms'):.3f} ms)")
if any(x["cs_a"] not in ("n/a", "") for x in rows):
    print("\ncontext switches per check (perf stat), medians: " + "; ".join(
        f"{c} at {int(r):,}/s: " + (f"E {med(c, r, 'cs_e'):.2f}" if c == "E" else f"A {med(c, r, 'cs_a'):.2f}, B {med(c, r, 'cs_b'):.2f}")
        for r in [rate] + extra_rates for c in "LRE" if per_round(c, r, "cs_a")))
bad = [x for x in rows if x["errors"] not in ("0", "") or x["degraded"] not in ("0", "")]
if bad:
    print(f"   WARNING: errors or degraded answers in {len(bad)} case(s); see results.tsv")
print(f"\nraw results: results.tsv, <case>-<rate>-<round>.json, A.log, B.log, E.log, machine.txt, registry.txt")
EOF
