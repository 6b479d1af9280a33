#!/usr/bin/env bash
# Stream throughput with the default limits, whose per-IP, per-API-key and
# global limits are routed through the repartition topic to their key's
# home partition, against the same limits each keyed by user_id too (all
# aligned: nothing routed). One quotaflow serve per run in Kafka mode on a
# topic of PARTITIONS partitions filled with COUNT events beforehand; timed
# from the first event consumed until every event is consumed and every
# routed record applied. Rounds alternate the order. docs/benchmarks.md,
# section 10.
#
#   scripts/bench-repartition.sh      COUNT=300000 PARTITIONS=4 ROUNDS=2
#
#   BASELINE=path/to/quotaflow   also run both configs with this binary in
#                                every round (runs named base-*): an A/B of
#                                two builds under the same conditions
#   FLOOR=1                      also run the raw consumer's decode-lookup
#                                floor (docs/benchmarks.md, section 5) on the
#                                same topic in every round
#
# One JSON line per run (cpu_us_per_event: the process's CPU, start-up
# included, over COUNT), then one line of medians per run kind.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh up 2>/dev/null)"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build -q --release --bin quotaflow
cargo build -q --release -p stream-bench
T="$TARGET/release"
OUT="$TARGET/bench-repartition"
mkdir -p "$OUT"
ROUNDS=${ROUNDS:-2}
COUNT=${COUNT:-300000}; PARTITIONS=${PARTITIONS:-4}
BASELINE=${BASELINE:-}; FLOOR=${FLOOR:-0}
RUN="qfrepart-$(date +%s)"
REQ="$RUN-requests"
RESULTS="$OUT/results-$RUN.jsonl"
$T/stream-bench topics "$REQ:$PARTITIONS" >/dev/null
$T/stream-bench fill --topic "$REQ" --count "$COUNT" --users 100000 --hot-users 100 --event-rate 40000 >$OUT/fill.json
# One scrape per sample, not one per series: a scrape of a busy processor
# can take over 0.1 s, and an aligned run of 300,000 events lasts well under
# a second. $1 is the scrape, $2 the series' name and labels.
metric() { awk -v m="$2" 'index($0,m)==1 {s+=$NF} END {printf "%d", s+0}' <<<"$1"; }
one() {
  local bin=$1 config=$2 name=$3 log=$OUT/$3.log
  rm -f "$log" # a new file: never an earlier run's address
  QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" QUOTAFLOW__REDIS__URL="$REDIS_URL" \
  QUOTAFLOW__KAFKA__GROUP_ID="$RUN-$name" QUOTAFLOW__REDIS__KEY_PREFIX="$RUN-$name" \
  QUOTAFLOW__KAFKA__REQUESTS_TOPIC="$REQ" QUOTAFLOW__KAFKA__REPARTITION_TOPIC="$RUN-$name-rep" \
  QUOTAFLOW__KAFKA__DECISIONS_TOPIC="$RUN-$name-d" QUOTAFLOW__KAFKA__ALERTS_TOPIC="$RUN-$name-a" \
  QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC="$RUN-$name-q" QUOTAFLOW__KAFKA__CONFIG_TOPIC="$RUN-$name-cfg" \
    "$bin" serve --config "$config" --listen 127.0.0.1:0 >"$log" 2>&1 &
  local pid=$! addr="" i
  for ((i = 0; i < 300; i++)); do
    addr=$(grep -m1 '"event":"listening"' "$log" 2>/dev/null | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true)
    [[ -n $addr ]] && break; sleep 0.1
  done
  local t0="" c=0 routed=0 applied=0
  while :; do
    local m; m=$(curl -s --max-time 2 "http://$addr/metrics" || true)
    c=$(metric "$m" quotaflow_events_consumed_total)
    if [[ -z $t0 && $c -gt 0 ]]; then t0=$(date +%s.%N); fi
    routed=$(metric "$m" 'quotaflow_repartition_records_total{outcome="routed"}')
    applied=$(metric "$m" 'quotaflow_repartition_records_total{outcome="applied"}')
    [[ $c -ge $COUNT && $applied -ge $routed ]] && break
    sleep 0.02
  done
  local t1; t1=$(date +%s.%N)
  local cpu; cpu=$(awk '{print ($14+$15)/100}' /proc/$pid/stat)
  kill -TERM $pid; wait $pid || true
  awk -v n="$name" -v c="$c" -v r="$routed" -v a="$applied" -v t0="$t0" -v t1="$t1" -v cpu="$cpu" 'BEGIN {
    printf "{\"run\":\"%s\",\"events\":%d,\"routed\":%d,\"applied\":%d,\"secs\":%.3f,\"events_per_s\":%d,\"cpu_s\":%.2f,\"cpu_us_per_event\":%.2f}\n",
      n, c, r, a, t1 - t0, c / (t1 - t0), cpu, cpu * 1e6 / c }' | tee -a "$RESULTS"
}
floor() {
  # CPU of the timed interval only (from the first record), as section 5.
  $T/stream-bench raw --topic "$REQ" --count "$COUNT" --group "$RUN-floor-$1" --work decode-lookup \
    --config scripts/bench/stream/throughput.toml |
    python3 -c 'import json,sys; v=json.load(sys.stdin); c=v["cpu"]; print(json.dumps({"run":"floor-'"$1"'","events_per_s":round(v["events_per_s"]),"cpu_us_per_event":round(c["process_pct_of_core"]/100*c["secs"]*1e6/v["count"],2)}))' |
    tee -a "$RESULTS"
}
round() {
  local r=$1 order=("$T/quotaflow:") i
  [[ -n $BASELINE ]] && order+=("$BASELINE:base-")
  (( r % 2 )) || order=($(printf '%s\n' "${order[@]}" | tac))
  for i in "${order[@]}"; do
    local bin=${i%%:*} tag=${i#*:}
    if (( r % 2 )); then
      one "$bin" scripts/bench/stream/throughput.toml "${tag}unaligned-$r"; one "$bin" scripts/bench/stream/throughput-aligned.toml "${tag}aligned-$r"
    else
      one "$bin" scripts/bench/stream/throughput-aligned.toml "${tag}aligned-$r"; one "$bin" scripts/bench/stream/throughput.toml "${tag}unaligned-$r"
    fi
  done
  (( FLOOR )) && floor "$r" || true
}
for ((r = 1; r <= ROUNDS; r++)); do round "$r"; done
python3 - "$RESULTS" <<'PY'
import json, statistics, sys, re
runs = {}
for line in open(sys.argv[1]):
    v = json.loads(line)
    runs.setdefault(re.sub(r"-\d+$", "", v["run"]), []).append(v)
med = {k: {m: statistics.median(x[m] for x in vs) for m in ("events_per_s", "cpu_us_per_event")} for k, vs in runs.items()}
for prefix in ("", "base-"):
    u, a = med.get(prefix + "unaligned"), med.get(prefix + "aligned")
    if u and a:
        med[prefix + "ratio"] = round(u["events_per_s"] / a["events_per_s"], 3)
        # Each round's unaligned over aligned rate, and their median.
        per = [x["events_per_s"] / y["events_per_s"] for x, y in zip(runs[prefix + "unaligned"], runs[prefix + "aligned"])]
        med[prefix + "ratio_of_rounds"] = round(statistics.median(per), 3)
print(json.dumps({"medians": med}))
PY
$T/stream-bench topics --delete "$REQ" >/dev/null 2>&1 || true
