#!/usr/bin/env bash
# Builds the real istiod (`pilot-discovery`) the istiod conformance suite runs, `adsc-probe`, a sidecar's view of it
# (an ADS client built on Istio's own `istio.io/istio/pkg/adsc`), `istioctl` (whose `create-remote-secret` the
# suite compares with meshfed's remote secrets) and `pilot-agent` (the agent of the data plane suite's pods and
# gateways, which drives the Envoy of `hack/envoy.sh`), from the istio.io/istio Go module through the Go module proxy,
# pinned, cached by version outside the work tree, under a lock. Prints the directory that holds them.
# Safe to run concurrently and repeatedly: a warm cache returns at once.
set -euo pipefail

# Istio's tags have no `v`, so the Go tool cannot name them: the proxy serves istio.io/istio as pseudo-versions.
# This one is master just before 1.31 (its go.mod has no replace directives, so it builds as is).
ISTIO_VERSION="${MESHFED_ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
CACHE="${MESHFED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}"
# The recipe revision is part of the cache key: bump it when this script builds differently.
OUT="$CACHE/istio-$ISTIO_VERSION-r4"
BINS=(pilot-discovery adsc-probe istioctl pilot-agent)

# pilot-agent renders Envoy's bootstrap from Istio's template, kept beside it.
TEMPLATE="$OUT/bin/envoy_bootstrap_tmpl.json"
ready() { for b in "${BINS[@]}"; do [ -x "$OUT/bin/$b" ] || return 1; done; [ -f "$TEMPLATE" ]; }
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
echo ">> building istiod (pilot-discovery, adsc-probe, istioctl and pilot-agent, istio.io/istio $ISTIO_VERSION) into $OUT/bin (first use only; several minutes)" >&2

cat >go.mod <<GOMOD
module meshfed.io/istio-binaries

go 1.26.0

require istio.io/istio $ISTIO_VERSION
GOMOD
cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "istio.io/istio/istioctl/cmd/istioctl"
	_ "istio.io/istio/pilot/cmd/pilot-agent"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
GO
mkdir adsc-probe
cat >adsc-probe/main.go <<'GO'
// adsc-probe connects to istiod's plaintext xDS port as a sidecar would (Istio's own ADS client, pkg/adsc), asks for
// CDS and then EDS, and prints as JSON what that sidecar is told about one cluster's endpoints:
// {"cluster": "<name>", "known": <in CDS>, "endpoints": [{"address","port","weight","tlsMode","workload"}]}.
// `workload` is istiod's telemetry label `<workload>;<namespace>;<service>;<revision>;<cluster ID>`; Envoy's
// endpoints carry no network, only the address a sidecar dials.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"istio.io/istio/pilot/pkg/model"
	v3 "istio.io/istio/pilot/pkg/xds/v3"
	"istio.io/istio/pkg/adsc"
	"istio.io/istio/pkg/log"
)

type endpointOut struct {
	Address  string `json:"address"`
	Port     uint32 `json:"port"`
	Weight   uint32 `json:"weight"`
	TLSMode  string `json:"tlsMode,omitempty"`
	Workload string `json:"workload,omitempty"`
}

func main() {
	addr := flag.String("addr", "", "istiod's plaintext xDS address (--grpcAddr)")
	clusterID := flag.String("cluster-id", "", "the sidecar's CLUSTER_ID")
	network := flag.String("network", "", "the sidecar's NETWORK")
	namespace := flag.String("namespace", "sample", "the sidecar's namespace")
	pod := flag.String("pod", "probe", "the sidecar's pod name")
	ip := flag.String("ip", "10.244.0.99", "the sidecar's pod IP")
	name := flag.String("cluster", "", "the Envoy cluster to print, e.g. outbound|5000||hello.sample.svc.cluster.local")
	timeout := flag.Duration("timeout", 10*time.Second, "how long to wait for CDS and EDS")
	flag.Parse()
	if *addr == "" || *name == "" {
		fmt.Fprintln(os.Stderr, "usage: adsc-probe --addr host:port --cluster-id c --network n --cluster outbound|port||host")
		os.Exit(2)
	}
	// Istio's logs go to stdout by default: keep stdout for the answer.
	logs := log.DefaultOptions()
	logs.OutputPaths = []string{"stderr"}
	logs.ErrorOutputPaths = []string{"stderr"}
	if err := log.Configure(logs); err != nil {
		fail("configuring logs: %v", err)
	}
	str := func(s string) *structpb.Value { return structpb.NewStringValue(s) }
	meta := &structpb.Struct{Fields: map[string]*structpb.Value{
		"CLUSTER_ID":    str(*clusterID),
		"NETWORK":       str(*network),
		"NAMESPACE":     str(*namespace),
		"ISTIO_VERSION": str("1.31.0"),
		"INSTANCE_IPS":  str(*ip),
	}}
	client, err := adsc.New(*addr, &adsc.ADSConfig{
		Config: adsc.Config{
			Namespace: *namespace,
			Workload:  *pod,
			IP:        *ip,
			Meta:      meta,
			NodeType:  model.SidecarProxy,
		},
		// CDS first; pkg/adsc then asks EDS for every EDS cluster it was given, as Envoy does.
		InitialDiscoveryRequests: []*discovery.DiscoveryRequest{{TypeUrl: v3.ClusterType}},
	})
	if err != nil {
		fail("dial %s: %v", *addr, err)
	}
	defer client.Close()
	if err := client.Run(); err != nil {
		fail("ADS stream to %s: %v", *addr, err)
	}
	if _, err := client.Wait(*timeout, v3.ClusterType, v3.EndpointType); err != nil {
		fail("waiting for CDS and EDS from %s: %v", *addr, err)
	}
	_, known := client.GetEdsClusters()[*name]
	out := struct {
		Cluster   string        `json:"cluster"`
		Known     bool          `json:"known"`
		Endpoints []endpointOut `json:"endpoints"`
	}{Cluster: *name, Known: known, Endpoints: []endpointOut{}}
	if cla, ok := client.GetEndpoints()[*name]; ok {
		for _, locality := range cla.GetEndpoints() {
			for _, lb := range locality.GetLbEndpoints() {
				sock := lb.GetEndpoint().GetAddress().GetSocketAddress()
				md := lb.GetMetadata().GetFilterMetadata()
				out.Endpoints = append(out.Endpoints, endpointOut{
					Address:  sock.GetAddress(),
					Port:     sock.GetPortValue(),
					Weight:   lb.GetLoadBalancingWeight().GetValue(),
					TLSMode:  md["envoy.transport_socket_match"].GetFields()["tlsMode"].GetStringValue(),
					Workload: md["istio"].GetFields()["workload"].GetStringValue(),
				})
			}
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintln(os.Stderr, "adsc-probe: "+strings.TrimSpace(fmt.Sprintf(format, args...)))
	os.Exit(1)
}
GO
export GOFLAGS=-mod=mod CGO_ENABLED=0
go mod tidy >&2
# Build next to the target and rename, so an interrupted build never leaves a binary that looks ready.
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/.pilot-discovery.tmp" istio.io/istio/pilot/cmd/pilot-discovery >&2
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/.adsc-probe.tmp" ./adsc-probe >&2
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/.istioctl.tmp" istio.io/istio/istioctl/cmd/istioctl >&2
go build -trimpath -ldflags='-s -w' -o "$OUT/bin/.pilot-agent.tmp" istio.io/istio/pilot/cmd/pilot-agent >&2
cp "$(go list -m -f '{{.Dir}}' istio.io/istio)/tools/packaging/common/envoy_bootstrap.json" "$TEMPLATE.tmp"
for b in "${BINS[@]}"; do mv "$OUT/bin/.$b.tmp" "$OUT/bin/$b"; done
mv "$TEMPLATE.tmp" "$TEMPLATE"
ready
echo "$OUT/bin"
