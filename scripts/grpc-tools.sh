#!/usr/bin/env bash
# gRPC client tools for tests/grpc.rs and scripts/bench-grpc.sh, installed once
# through the Go module proxy (`go install`) and cached OUTSIDE the repo:
#
#   grpcurl  a real external gRPC client: reflection (`list`), health, calls
#   ghz      gRPC load generator (scripts/bench-grpc.sh)
#
# Usage: eval "$(scripts/grpc-tools.sh)"            both
#        eval "$(scripts/grpc-tools.sh grpcurl)"    one of them
#
# Prints only this line on stdout (progress goes to stderr):
#   export PATH="<cache>/tools/bin:$PATH"
# On failure stdout is the single word `false`, so the eval fails too.
# Idempotent: a tool whose version did not change is not rebuilt (a stamp
# per tool under <cache>/tools/stamps). Concurrent runs wait for each other.
#
# Kept apart from scripts/tools.sh (the deployment checks' tools) so each can
# change on its own; both install into the same <cache>/tools/bin.
#
# Environment (optional): QUOTAFLOW_CACHE (~/.cache/quotaflow).
set -Eeuo pipefail

GRPCURL_VERSION=v1.9.4
# The newest release; the proxy's `@latest` says v0.93.0, an older tag line.
GHZ_VERSION=v0.120.0

CACHE=${QUOTAFLOW_CACHE:-${HOME:-/root}/.cache/quotaflow}
TOOLS=$CACHE/tools
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps

log() { echo "grpc-tools.sh: $*" >&2; }
die() {
  log "error: $*"
  echo false
  exit 1
}
trap 'die "failed at line $LINENO"' ERR

# Never let `go` fetch a toolchain of its own: only modules come from the proxy.
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

grpc_tools_install() { # name module version
  local name=$1 module=$2 version=$3
  if [ -f "$STAMPS/$name" ] && [ "$(cat "$STAMPS/$name")" = "$version" ] && [ -x "$BIN/$name" ]; then
    return 0
  fi
  command -v go >/dev/null || die "go is needed to install $name (apt-get install golang-go)"
  log "installing $name $version (go install, once; a minute or two)"
  local tmp
  tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
  # From /, so no go.mod of the repo is in the way.
  (cd / && GOBIN=$tmp go install "$module@$version") >&2
  mv -f "$tmp/$name" "$BIN/$name"
  rm -rf "$tmp"
  echo "$version" >"$STAMPS/$name"
}

main() {
  mkdir -p "$BIN" "$STAMPS"
  exec 9>"$TOOLS/.grpc-tools.lock"
  flock 9
  local want=("$@")
  [ ${#want[@]} -gt 0 ] || want=(grpcurl ghz)
  for t in "${want[@]}"; do
    case "$t" in
      grpcurl) grpc_tools_install grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION" ;;
      ghz) grpc_tools_install ghz github.com/bojand/ghz/cmd/ghz "$GHZ_VERSION" ;;
      *) die "unknown tool '$t' (grpcurl, ghz)" ;;
    esac
  done
  echo "export PATH=\"$BIN:\$PATH\""
}

main "$@"
