#!/usr/bin/env bash
# Renders the plain manifests deploy/meshfed.yaml from the Helm chart, with the chart's defaults into the namespace
# meshfed-system. The `packaging` test fails when the committed file differs from what the chart renders.
# Usage: hack/render-manifests.sh            (write deploy/meshfed.yaml)
#        hack/render-manifests.sh --stdout   (print it)
set -euo pipefail
cd "$(dirname "$0")/.."
helm=$(hack/helm.sh)
render() {
  echo "# meshfed, rendered from charts/meshfed by hack/render-manifests.sh: do not edit."
  echo "#   kubectl create namespace meshfed-system && kubectl apply --server-side -f deploy/meshfed.yaml"
  "$helm" template meshfed charts/meshfed --namespace meshfed-system --include-crds
}
if [ "${1:-}" = "--stdout" ]; then render; else render >deploy/meshfed.yaml; fi
