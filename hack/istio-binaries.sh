#!/usr/bin/env bash
# Builds the real istiod (`pilot-discovery`) the istiod conformance suite runs, from the istio.io/istio Go module
# through the Go module proxy, pinned, cached by version outside the work tree, under a lock. Prints the directory
# that holds it. Safe to run concurrently and repeatedly: a warm cache returns at once.
set -euo pipefail

# Istio's tags have no `v`, so the Go tool cannot name them: the proxy serves istio.io/istio as pseudo-versions.
# This one is master just before 1.31 (its go.mod has no replace directives, so it builds as is).
ISTIO_VERSION="${MESHFED_ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
CACHE="${MESHFED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}"
# The recipe revision is part of the cache key: bump it when this script builds differently.
OUT="$CACHE/istio-$ISTIO_VERSION-r1"
BINS=(pilot-discovery)

ready() { for b in "${BINS[@]}"; do [ -x "$OUT/bin/$b" ] || return 1; done; }
if ready; then echo "$OUT/bin"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$OUT.lock"
flock 9
if ready; then echo "$OUT/bin"; exit 0; fi

command -v go >/dev/null || { echo "go is required to build istiod (https://go.dev/dl)" >&2; exit 1; }
SRC="$OUT/src"
rm -rf "$SRC"
mkdir -p "$SRC" "$OUT/bin"
cd "$SRC"
echo ">> building istiod (pilot-discovery, istio.io/istio $ISTIO_VERSION) into $OUT/bin (first use only; several minutes)" >&2

cat >go.mod <<GOMOD
module meshfed.io/istio-binaries

go 1.26.0

require istio.io/istio $ISTIO_VERSION
GOMOD
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
GO
export GOFLAGS=-mod=mod CGO_ENABLED=0
go mod tidy >&2
# Build next to the target and rename, so an interrupted build never leaves a binary that looks ready.
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/.pilot-discovery.tmp" istio.io/istio/pilot/cmd/pilot-discovery >&2
mv "$OUT/bin/.pilot-discovery.tmp" "$OUT/bin/pilot-discovery"
ready
echo "$OUT/bin"
