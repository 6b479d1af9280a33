#!/usr/bin/env bash
# Tools for tests/deploy.rs (the deployment files' checks), installed once and
# cached OUTSIDE the repo, from package registries only:
#
#   kubeconform       Kubernetes manifests against the API's JSON schemas
#                     (go install, Go module proxy)
#   kustomize         renders deploy/kubernetes (go install)
#   compose-check     docker-compose.yml through compose-go, the Compose
#                     Specification's loader and schema (tools/compose-check)
#   dockerfile-check  deploy/Dockerfile through BuildKit's parser and the
#                     `docker build --check` rules (tools/dockerfile-check)
#   yaml2json         YAML to JSON for the tests' assertions (tools/yaml2json)
#   envoy-ratelimit   envoyproxy/ratelimit, pinned (go install): tests/import_envoy.rs
#                     compares its verdicts with an imported config's, and
#                     scripts/bench-redis.sh benchmarks against it
#   Kubernetes JSON schemas, from PyPI's kubernetes-validate wheel, made
#   standalone for kubeconform (it cannot reach the schemas it downloads by
#   default)
#
# Usage: eval "$(scripts/tools.sh)"
#        eval "$(scripts/tools.sh envoy-ratelimit)"   (that one only)
#
# Prints only these lines on stdout (progress goes to stderr):
#   export PATH="<cache>/tools/bin:$PATH"
#   export QUOTAFLOW_K8S_SCHEMAS=<cache>/tools/k8s-schemas/kubernetes-validate-<version>
#   export ENVOY_RATELIMIT_BIN=<cache>/tools/bin/envoy-ratelimit
# On failure stdout is the single word `false`, so the eval fails too.
# Idempotent: a tool whose version (or, for the repo's own Go tools, whose
# sources) did not change is not rebuilt; a second run takes well under a
# second. Concurrent runs wait for each other (flock).
#
# Environment (optional): QUOTAFLOW_CACHE (~/.cache/quotaflow); GOMODCACHE,
# GOCACHE as usual for Go; ENVOY_RATELIMIT_VERSION (the module version of
# github.com/envoyproxy/ratelimit; pinned below).
set -Eeuo pipefail

KUBECONFORM_VERSION=v0.8.0
KUSTOMIZE_VERSION=v5.8.2 # v5.8.3 needs Go 1.27; the machines have 1.26
KUBERNETES_VALIDATE_VERSION=1.37.0
# The Kubernetes versions tests/deploy.rs validates against: the oldest and
# the newest the wheel carries.
K8S_VERSIONS=(1.25.0 1.37.0)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${QUOTAFLOW_CACHE:-${HOME:-/root}/.cache/quotaflow}
TOOLS=$CACHE/tools
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps
SCHEMAS=$TOOLS/k8s-schemas/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION

log() { echo "tools.sh: $*" >&2; }
die() {
  log "error: $*"
  echo false
  exit 1
}
trap 'die "failed at line $LINENO"' ERR

# Never let `go` fetch a toolchain of its own: only modules come from the proxy.
export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -buildvcs=false"

stamp_is() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ] && [ -x "$BIN/$1" ]; }

go_install() { # name module version
  local name=$1 module=$2 version=$3
  stamp_is "$name" "$version" && return 0
  log "installing $name $version (go install, once)"
  local tmp
  tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
  GOBIN=$tmp go install "$module@$version" >&2
  mv -f "$tmp/$name" "$BIN/$name"
  rm -rf "$tmp"
  echo "$version" >"$STAMPS/$name"
}

go_build_local() { # name: builds tools/<name>, rebuilt when its sources change
  local name=$1 dir=$REPO/tools/$1 hash
  hash=$(cd "$dir" && cat go.mod go.sum ./*.go | sha256sum | cut -d' ' -f1)
  hash="$hash $(go env GOVERSION)"
  stamp_is "$name" "$hash" && return 0
  log "building $name (tools/$name, once per change)"
  go -C "$dir" build -trimpath -o "$BIN/$name.tmp" . >&2
  mv -f "$BIN/$name.tmp" "$BIN/$name"
  echo "$hash" >"$STAMPS/$name"
}

k8s_schemas() {
  local want="$KUBERNETES_VALIDATE_VERSION ${K8S_VERSIONS[*]} v2"
  [ -f "$SCHEMAS/.complete" ] && [ "$(cat "$SCHEMAS/.complete")" = "$want" ] && return 0
  log "fetching Kubernetes schemas (kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI, once)"
  local tmp
  tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp/wheel" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
  # The wheel's schemas name each other by absolute URLs under
  # https://kubernetes.io/api/ ("$id", "$ref": "/api/_definitions.json#...");
  # kubeconform would fetch those. Drop "$id" and make the references
  # relative, so they resolve to the _definitions.json beside each file.
  python3 - "$tmp/wheel"/*.whl "$tmp/out" "${K8S_VERSIONS[@]}" >&2 <<'PY'
import json, os, sys, zipfile
wheel, out, versions = sys.argv[1], sys.argv[2], sys.argv[3:]
prefixes = {f"kubernetes_validate/kubernetes-json-schema/v{v}-local-strict/": f"v{v}-local-strict" for v in versions}
z = zipfile.ZipFile(wheel)
found = set()
for name in z.namelist():
    for prefix, target in prefixes.items():
        if name.startswith(prefix) and name.endswith(".json"):
            doc = json.loads(z.read(name))
            doc.pop("$id", None)
            text = json.dumps(doc).replace('"/api/_definitions.json#', '"_definitions.json#')
            os.makedirs(os.path.join(out, target), exist_ok=True)
            with open(os.path.join(out, target, name[len(prefix):]), "w") as f:
                f.write(text)
            found.add(target)
missing = set(prefixes.values()) - found
if missing:
    sys.exit(f"kubernetes-validate has no schemas for {sorted(missing)}")
PY
  rm -rf "$SCHEMAS"
  mkdir -p "$(dirname "$SCHEMAS")"
  mv "$tmp/out" "$SCHEMAS"
  rm -rf "$tmp"
  echo "$want" >"$SCHEMAS/.complete"
}

# ------------------------------------------------------- envoy ratelimit --
# The service Envoy's global rate limit filter calls. It publishes no
# binaries: `go install` of its server command through the Go module proxy.
# Pinned, since tests/import_envoy.rs asserts its verdicts.
ENVOY_RATELIMIT_VERSION=${ENVOY_RATELIMIT_VERSION:-v1.4.1-0.20260122083618-3fb702589d36}

envoy_ratelimit() {
  stamp_is envoy-ratelimit "$ENVOY_RATELIMIT_VERSION" && return 0
  log "installing envoy ratelimit $ENVOY_RATELIMIT_VERSION (go install, once; a minute or two)"
  local tmp
  tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
  GOBIN=$tmp go install "github.com/envoyproxy/ratelimit/src/service_cmd@$ENVOY_RATELIMIT_VERSION" >&2
  mv -f "$tmp/service_cmd" "$BIN/envoy-ratelimit"
  rm -rf "$tmp"
  echo "$ENVOY_RATELIMIT_VERSION" >"$STAMPS/envoy-ratelimit"
}
# ---------------------------------------------------------------------------

# The Go toolchain's usual place, for a shell whose PATH lacks it.
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || die "go is not installed (the Go toolchain builds the deploy checks)"
command -v python3 >/dev/null || die "python3 is not installed (pip fetches the Kubernetes schemas)"
mkdir -p "$BIN" "$STAMPS"
exec 9>"$TOOLS/.lock"
flock -w 900 9 || die "another scripts/tools.sh holds $TOOLS/.lock"

if [ "${1:-}" = envoy-ratelimit ]; then
  envoy_ratelimit
  printf 'export ENVOY_RATELIMIT_BIN=%s\n' "$BIN/envoy-ratelimit"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (none, or envoy-ratelimit)"

go_install kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
go_install kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
go_build_local compose-check
go_build_local dockerfile-check
go_build_local yaml2json
k8s_schemas
envoy_ratelimit

# $PATH stays literal: it expands in the caller's shell, at the eval.
# shellcheck disable=SC2016
printf 'export PATH="%s:$PATH"\n' "$BIN"
printf 'export QUOTAFLOW_K8S_SCHEMAS=%s\n' "$SCHEMAS"
printf 'export ENVOY_RATELIMIT_BIN=%s\n' "$BIN/envoy-ratelimit"
