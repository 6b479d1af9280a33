# shellcheck shell=bash
# Shell functions shared by scripts/bench-http.sh and scripts/bench-redis.sh
# (sourced; they define `say` and NICE first).

run() { nice -n "$NICE" "$@"; }

# CPU seconds (user + system) used so far by process $1.
cpu_secs() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"
}

# Percentage of CPU time idle over the next 2 seconds (all cores).
idle_pct() {
  local a b
  a="$(head -1 /proc/stat)"
  sleep 2
  b="$(head -1 /proc/stat)"
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); t = 0
    for (i = 2; i <= n; i++) t += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%d", (t > 0) ? 100 * idle / t : 0 }'
}

# CPU microseconds per request: CPU seconds $1 -> $2 over $3 requests.
per_req_us() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { if (n > 0) printf "%.1f", (b - a) / n * 1e6; else print "n/a" }'; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt-get install, with one `apt-get update` per run.
APT_UPDATED=0
apt_install() {
  say "installing $* (apt)"
  if [ "$APT_UPDATED" -eq 0 ]; then
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
