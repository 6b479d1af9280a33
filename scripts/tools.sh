#!/usr/bin/env bash
# Peers and tools that tests and benchmarks run beside quotaflow, built once
# into $QUOTAFLOW_CACHE (outside the repo) and reused. One function per tool,
# each idempotent and safe to run from several processes at once (a lock per
# tool); progress goes to stderr, the tool's path to stdout.
#
# Usage:
#   scripts/tools.sh envoy-ratelimit    install if missing, print the path of
#                                       envoyproxy/ratelimit's server binary
# or, from another script:
#   . scripts/tools.sh && bin=$(tool_envoy_ratelimit)
#
# Environment (all optional):
#   QUOTAFLOW_CACHE          cache root (~/.cache/quotaflow)
#   ENVOY_RATELIMIT_VERSION  module version of github.com/envoyproxy/ratelimit
#                            (pinned below: the tests compare verdicts with
#                            this one)

TOOLS_CACHE=${QUOTAFLOW_CACHE:-${HOME:-/root}/.cache/quotaflow}

tools_log() { printf 'tools: %s\n' "$*" >&2; }

# ------------------------------------------------------- envoy ratelimit --
# envoyproxy/ratelimit, the Go service Envoy's rate limit filter calls:
# `go install .../src/service_cmd@VERSION` through the Go module proxy (it
# publishes no binaries). Used by tests/import_envoy.rs (the same requests
# against it and an imported quotaflow config) and scripts/bench-redis.sh.
ENVOY_RATELIMIT_PINNED=v1.4.1-0.20260122083618-3fb702589d36

tool_envoy_ratelimit() {
  local version=${ENVOY_RATELIMIT_VERSION:-$ENVOY_RATELIMIT_PINNED}
  local dir=$TOOLS_CACHE/envoy-ratelimit/$version
  local bin=$dir/service_cmd go log_file
  mkdir -p "$dir" "$TOOLS_CACHE/logs" || return 1
  (
    flock -w 900 9 || {
      tools_log "another install of envoy ratelimit holds $dir/.lock"
      exit 1
    }
    [[ -x $bin ]] && exit 0
    go=$(command -v go || true)
    [[ -z $go && -x /usr/local/go/bin/go ]] && go=/usr/local/go/bin/go
    if [[ -z $go ]]; then
      tools_log "installing Debian's golang-go (no go on the PATH)"
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >&2 || exit 1
      go=$(command -v go)
    fi
    log_file=$TOOLS_CACHE/logs/envoy-ratelimit-install.log
    tools_log "go install github.com/envoyproxy/ratelimit/src/service_cmd@$version (once; a minute or two; log: $log_file)"
    # From / so no go.mod around is in the way; into a temporary GOBIN so a
    # cut-short build never leaves a binary that looks installed.
    rm -rf "$dir/.tmp" && mkdir -p "$dir/.tmp"
    if ! (cd / && GOBIN="$dir/.tmp" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
      "$go" install "github.com/envoyproxy/ratelimit/src/service_cmd@$version") >"$log_file" 2>&1; then
      tail -n 20 "$log_file" >&2
      tools_log "go install of envoy ratelimit failed (its go.mod may need a newer Go than $("$go" env GOVERSION))"
      exit 1
    fi
    mv -f "$dir/.tmp/service_cmd" "$bin" && rm -rf "$dir/.tmp"
  ) 9>"$dir/.lock" || return 1
  printf '%s\n' "$bin"
}

# ------------------------------------------------------------------- main --
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case ${1:-} in
    envoy-ratelimit) tool_envoy_ratelimit ;;
    *)
      sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
      exit 64
      ;;
  esac
fi
