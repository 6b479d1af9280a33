#!/usr/bin/env bash
# The one command that passes every test: formatting, lints, unit, property
# and integration tests against a real Kafka and a real Redis, which it
# installs (once, cached outside the repo) and starts (idempotently) through
# scripts/services.sh. Fails on any failure and on any skipped test.
#
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> starting Kafka and Redis (scripts/services.sh up)"
services_env=$(scripts/services.sh up)
eval "$services_env"
export KAFKA_BOOTSTRAP_SERVERS REDIS_URL
# kubeconform, kustomize, compose/Dockerfile checkers for tests/deploy.rs
# (assigned first, so that a failing install stops the run).
tools_env=$(scripts/tools.sh)
eval "$tools_env"

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Property tests run with a fixed case count so CI time is predictable.
PROPTEST_CASES="${PROPTEST_CASES:-256}" cargo test --workspace --locked 2>&1 | tee "$log"

# A test that did not run is a failure, not a pass.
if grep -Eq 'test result: .* [1-9][0-9]* ignored' "$log"; then
  echo "error: some tests were ignored (skipped); CI treats that as a failure" >&2
  exit 1
fi
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo "${passed} passed, ${failed} failed"
