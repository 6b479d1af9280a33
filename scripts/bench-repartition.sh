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
RUN="qfrepart-$(date +%s)"
REQ="$RUN-requests"
$T/stream-bench topics "$REQ:$PARTITIONS" >/dev/null
$T/stream-bench fill --topic "$REQ" --count "$COUNT" --users 100000 --hot-users 100 --event-rate 40000 >$OUT/fill.json
metric() { curl -s --max-time 2 "http://$1/metrics" | awk -v m="$2" 'index($0,m)==1 {s+=$NF} END {printf "%d", s+0}'; }
one() {
  local config=$1 name=$2 log=$OUT/$2.log
  QUOTAFLOW__KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" QUOTAFLOW__REDIS__URL="$REDIS_URL" \
  QUOTAFLOW__KAFKA__GROUP_ID="$RUN-$name" QUOTAFLOW__REDIS__KEY_PREFIX="$RUN-$name" \
  QUOTAFLOW__KAFKA__REQUESTS_TOPIC="$REQ" QUOTAFLOW__KAFKA__REPARTITION_TOPIC="$RUN-$name-rep" \
  QUOTAFLOW__KAFKA__DECISIONS_TOPIC="$RUN-$name-d" QUOTAFLOW__KAFKA__ALERTS_TOPIC="$RUN-$name-a" \
  QUOTAFLOW__KAFKA__DEAD_LETTER_TOPIC="$RUN-$name-q" QUOTAFLOW__KAFKA__CONFIG_TOPIC="$RUN-$name-cfg" \
    $T/quotaflow serve --config "$config" --listen 127.0.0.1:0 >"$log" 2>&1 &
  local pid=$! addr="" i
  for ((i = 0; i < 300; i++)); do
    addr=$(grep -m1 '"event":"listening"' "$log" 2>/dev/null | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true)
    [[ -n $addr ]] && break; sleep 0.1
  done
  local t0="" c=0 routed=0 applied=0
  while :; do
    c=$(metric "$addr" quotaflow_events_consumed_total)
    if [[ -z $t0 && $c -gt 0 ]]; then t0=$(date +%s.%N); fi
    routed=$(metric "$addr" 'quotaflow_repartition_records_total{outcome="routed"}')
    applied=$(metric "$addr" 'quotaflow_repartition_records_total{outcome="applied"}')
    [[ $c -ge $COUNT && $applied -ge $routed ]] && break
    sleep 0.05
  done
  local t1; t1=$(date +%s.%N)
  local cpu; cpu=$(awk '{print ($14+$15)/100}' /proc/$pid/stat)
  kill -TERM $pid; wait $pid || true
  echo "{\"run\":\"$name\",\"events\":$c,\"routed\":$routed,\"applied\":$applied,\"secs\":$(echo "$t1 - $t0" | bc),\"events_per_s\":$(echo "$c / ($t1 - $t0)" | bc),\"cpu_s\":$cpu}"
}
for ((r = 1; r <= ROUNDS; r++)); do
  if (( r % 2 )); then
    one scripts/bench/stream/throughput.toml "unaligned-$r"; one scripts/bench/stream/throughput-aligned.toml "aligned-$r"
  else
    one scripts/bench/stream/throughput-aligned.toml "aligned-$r"; one scripts/bench/stream/throughput.toml "unaligned-$r"
  fi
done
$T/stream-bench topics --delete "$REQ" >/dev/null 2>&1 || true
