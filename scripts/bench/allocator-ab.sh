#!/usr/bin/env bash
# A/B of the sidecar's POST /check throughput under three malloc
# implementations, without changing the binary: glibc (default), jemalloc and
# mimalloc loaded with LD_PRELOAD (Rust's default allocator calls malloc).
# Evidence for the allocator recommendation in docs/benchmarks.md.
#
#   scripts/bench/allocator-ab.sh            (after scripts/bench-http.sh built the binary)
#
# Alternates the three ROUNDS times (default 3), 10 s of wrk each, on
# 127.0.0.1:PORT (default 18183), and prints requests/s and server CPU
# microseconds per request for each run. Installs libjemalloc2 and
# libmimalloc2.0 from Debian when missing. NICE as in bench-http.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT="${PORT:-18183}"
ROUNDS="${ROUNDS:-3}"
NICE="${NICE:-0}"
CONNECTIONS="${CONNECTIONS:-32}"
BIN="${CARGO_TARGET_DIR:-target}/release/quotaflow"
LIB=/usr/lib/x86_64-linux-gnu
URL="http://127.0.0.1:${PORT}/check"

case "$PORT$ROUNDS$CONNECTIONS" in *[!0-9]*) echo "PORT, ROUNDS, CONNECTIONS: integers" >&2; exit 1 ;; esac
[ "$ROUNDS" -le 10 ] || { echo "ROUNDS must be at most 10" >&2; exit 1; }
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -e "$LIB/libjemalloc.so.2" ] || [ ! -e "$LIB/libmimalloc.so.2" ] || ! command -v wrk >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 libmimalloc2.0 wrk >/dev/null
fi

PID=""
stop() {
  if [ -n "$PID" ]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

one() { # label preload
  LD_PRELOAD="$2" nice -n "$NICE" "$BIN" serve --config scripts/bench/bench.toml \
    --listen "127.0.0.1:${PORT}" >/dev/null 2>&1 &
  PID=$!
  for _ in $(seq 50); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:${PORT}/readyz" && break
    sleep 0.1
  done
  nice -n "$NICE" timeout 30 wrk -t1 -c"$CONNECTIONS" -d3s -s scripts/bench/check.lua "$URL" >/dev/null
  local c0 c1 out
  c0="$(cpu_ticks "$PID")"
  out="$(nice -n "$NICE" timeout 40 wrk -t1 -c"$CONNECTIONS" -d10s -s scripts/bench/check.lua "$URL")"
  c1="$(cpu_ticks "$PID")"
  stop
  awk -v label="$1" -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" '
    /requests in/ { n = $1 } /^Requests\/sec:/ { r = $2 }
    END { printf "%-9s %8.0f req/s  %5.1f us server CPU per request\n", label, r, (b - a) / hz / n * 1e6 }' <<<"$out"
}

for _ in $(seq "$ROUNDS"); do
  one glibc ""
  one jemalloc "$LIB/libjemalloc.so.2"
  one mimalloc "$LIB/libmimalloc.so.2"
done
