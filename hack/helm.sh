#!/usr/bin/env bash
# Builds the pinned `helm` the tests lint and render the chart with, from its Go module through the Go module proxy,
# cached by version outside the work tree, under a lock. Prints the binary's path. A warm cache returns at once.
# Usage: hack/helm.sh            (print the path)
#        hack/helm.sh -- ARGS    (run helm with ARGS)
set -euo pipefail

HELM_VERSION="${MESHFED_HELM_VERSION:-v3.22.0}"
CACHE="${MESHFED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}"
OUT="$CACHE/helm-$HELM_VERSION"

build() {
  [ -x "$OUT/helm" ] && return
  mkdir -p "$CACHE"
  exec 9>"$OUT.lock"
  flock 9
  [ -x "$OUT/helm" ] && return
  command -v go >/dev/null || { echo "go is required to build helm (https://go.dev/dl)" >&2; exit 1; }
  echo ">> building helm $HELM_VERSION into $OUT (first use only; a few minutes)" >&2
  mkdir -p "$OUT"
  # Stamp the version, as a release build does, so `helm version` reports it.
  CGO_ENABLED=0 GOBIN="$OUT" go install -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
}

build
if [ "${1:-}" = "--" ]; then
  shift
  exec "$OUT/helm" "$@"
fi
echo "$OUT/helm"
