#!/bin/sh
# Empty sources for every target the workspace's manifests declare, so
# deploy/Dockerfile can build all dependencies in a layer of their own from
# the manifests and Cargo.lock alone. Creates only files that are missing.
# tests/deploy.rs checks that the manifests load against these stubs.
set -eu
stub() {
  [ -e "$1" ] && return 0
  mkdir -p "$(dirname "$1")"
  printf '%s\n' "$2" >"$1"
}
stub src/main.rs 'fn main() {}'
stub src/lib.rs ''
stub crates/quotaflow-core/src/lib.rs ''
stub crates/quotaflow-adapters/src/lib.rs ''
stub tools/stream-bench/src/main.rs 'fn main() {}'
for bench in check codec memory restore; do
  stub "benches/$bench.rs" 'fn main() {}'
done
