#!/usr/bin/env bash
# Builds the real Kubernetes binaries the tests and the demo run (kube-apiserver, kube-controller-manager, etcd)
# from their Go modules through the Go module proxy, pinned, cached by version outside the work tree, under a lock.
# Prints the directory that holds them. Safe to run concurrently and repeatedly: a warm cache returns at once.
set -euo pipefail

K8S_VERSION="${MESHFED_K8S_VERSION:-v1.34.2}"
CACHE="${MESHFED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}"
# The recipe revision is part of the cache key: bump it when this script builds differently.
OUT="$CACHE/k8s-$K8S_VERSION-r2"
BINS=(kube-apiserver kube-controller-manager etcd)

ready() { for b in "${BINS[@]}"; do [ -x "$OUT/bin/$b" ] || return 1; done; }
if ready; then echo "$OUT/bin"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$OUT.lock"
flock 9
if ready; then echo "$OUT/bin"; exit 0; fi

command -v go >/dev/null || { echo "go is required to build the Kubernetes binaries (https://go.dev/dl)" >&2; exit 1; }
minor="${K8S_VERSION#v1.}"
STAGING="v0.${minor}"
SRC="$OUT/src"
rm -rf "$SRC"
mkdir -p "$SRC/etcd" "$OUT/bin"
cd "$SRC"
echo ">> building Kubernetes $K8S_VERSION binaries into $OUT/bin (first use only; several minutes)" >&2

# k8s.io/kubernetes requires its staging modules as v0.0.0 and replaces them with ./staging; map each one to its
# published version instead.
kdir=$(cd "$OUT" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -n "$kdir" ] || { echo "could not download k8s.io/kubernetes@$K8S_VERSION through the Go module proxy" >&2; exit 1; }
{
  echo "module meshfed.io/k8s-binaries"
  echo
  echo "go 1.24.0"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kdir/go.mod" | while read -r m; do
    echo "	$m => $m $STAGING"
  done
  echo ")"
} >go.mod
cat >etcd/main.go <<'GO'
// etcd, built from the same module graph as kube-apiserver so the versions match.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
export GOFLAGS=-mod=mod CGO_ENABLED=0
go mod tidy >&2
# Stamp the version a real release build carries, so that /version reports it.
major_minor="${K8S_VERSION#v}"
ver="k8s.io/component-base/version"
ldflags="-s -w -X $ver.gitVersion=$K8S_VERSION -X $ver.gitMajor=${major_minor%%.*} -X $ver.gitMinor=$(echo "$major_minor" | cut -d. -f2) -X $ver.gitTreeState=clean"
for cmd in kube-apiserver kube-controller-manager; do
  go build -trimpath -ldflags="$ldflags" -o "$OUT/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
done
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/etcd" ./etcd >&2
ready
echo "$OUT/bin"
