#!/usr/bin/env bash
# Builds the real istiod (`pilot-discovery`) the istiod conformance suite runs, `adsc-probe`, a sidecar's or a
# ztunnel's view of it (ADS clients built on Istio's own `istio.io/istio/pkg/adsc`), `istioctl` (whose `create-remote-secret` the
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
OUT="$CACHE/istio-$ISTIO_VERSION-r5"
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
//
// With --wds it connects as a ztunnel instead (node type ztunnel, delta xDS, Istio's delta client), asks for every
// `istio.workload.Address` (WDS) and prints them: {"workloads": [...], "services": [...]} (see wdsOut).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"istio.io/istio/pilot/pkg/model"
	v3 "istio.io/istio/pilot/pkg/xds/v3"
	"istio.io/istio/pkg/adsc"
	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/workloadapi"
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
	wds := flag.Bool("wds", false, "ask as a ztunnel for every workload address (WDS) instead")
	flag.Parse()
	if *addr != "" && *wds {
		configureLogs()
		printWDS(*addr, *clusterID, *network, *ip, *timeout)
		return
	}
	if *addr == "" || *name == "" {
		fmt.Fprintln(os.Stderr, "usage: adsc-probe --addr host:port --cluster-id c --network n --cluster outbound|port||host")
		os.Exit(2)
	}
	configureLogs()
	client, err := adsc.New(*addr, &adsc.ADSConfig{
		Config: adsc.Config{
			Namespace: *namespace,
			Workload:  *pod,
			IP:        *ip,
			Meta:      nodeMeta(*clusterID, *network, *namespace, *ip),
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

// configureLogs sends Istio's logs, which go to stdout by default, to stderr: stdout is for the answer.
func configureLogs() {
	logs := log.DefaultOptions()
	logs.OutputPaths = []string{"stderr"}
	logs.ErrorOutputPaths = []string{"stderr"}
	if err := log.Configure(logs); err != nil {
		fail("configuring logs: %v", err)
	}
}

// nodeMeta is the node metadata a proxy's agent sends istiod.
func nodeMeta(clusterID, network, namespace, ip string) *structpb.Struct {
	str := func(s string) *structpb.Value { return structpb.NewStringValue(s) }
	return &structpb.Struct{Fields: map[string]*structpb.Value{
		"CLUSTER_ID":    str(clusterID),
		"NETWORK":       str(network),
		"NAMESPACE":     str(namespace),
		"ISTIO_VERSION": str("1.31.0"),
		"INSTANCE_IPS":  str(ip),
	}}
}

// A workload as WDS tells a ztunnel of it: its pod addresses (none for a remote network's workloads, which are
// reached through `gateway`), its network and cluster, and the Services (namespace/hostname) it backs.
type workloadOut struct {
	UID            string   `json:"uid"`
	Name           string   `json:"name"`
	Namespace      string   `json:"namespace"`
	ClusterID      string   `json:"clusterId"`
	Network        string   `json:"network"`
	Addresses      []string `json:"addresses"`
	TunnelProtocol string   `json:"tunnelProtocol"`
	// The network gateway a ztunnel on another network tunnels to: "<network>/<address>" and its HBONE port.
	Gateway       string   `json:"gateway,omitempty"`
	GatewayPort   uint32   `json:"gatewayPort,omitempty"`
	Capacity      uint32   `json:"capacity,omitempty"`
	Services      []string `json:"services"`
}

// A Service as WDS tells a ztunnel of it: its virtual addresses as "<network>/<address>".
type serviceOut struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Hostname  string   `json:"hostname"`
	Addresses []string `json:"addresses"`
}

type wdsOut struct {
	Workloads []workloadOut `json:"workloads"`
	Services  []serviceOut  `json:"services"`
}

func ipString(b []byte) string {
	if a, ok := netip.AddrFromSlice(b); ok {
		return a.String()
	}
	return fmt.Sprintf("%x", b)
}

// printWDS asks istiod, as a ztunnel of `clusterID` on `network` at `ip`, for every workload address (wildcard
// delta WDS) and prints what it was told once the first answer is in.
func printWDS(addr, clusterID, network, ip string, timeout time.Duration) {
	var mu sync.Mutex
	addresses := map[string]*workloadapi.Address{}
	handler := adsc.Register(func(_ adsc.HandlerContext, name, _ string, a *workloadapi.Address, event adsc.Event) {
		mu.Lock()
		defer mu.Unlock()
		if event == adsc.EventDelete {
			delete(addresses, name)
			return
		}
		addresses[name] = a
	})
	client := adsc.NewDelta(addr, &adsc.DeltaADSConfig{Config: adsc.Config{
		Namespace: "istio-system",
		Workload:  "ztunnel-probe",
		IP:        ip,
		Meta:      nodeMeta(clusterID, network, "istio-system", ip),
		NodeType:  model.Ztunnel,
	}}, handler, adsc.Watch[*workloadapi.Address]("*"))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go client.Run(ctx)
	select {
	case <-client.Synced():
	case <-ctx.Done():
		fail("no WDS answer from %s within %v", addr, timeout)
	}
	client.Close()
	mu.Lock()
	defer mu.Unlock()
	out := wdsOut{Workloads: []workloadOut{}, Services: []serviceOut{}}
	for _, a := range addresses {
		if w := a.GetWorkload(); w != nil {
			o := workloadOut{
				UID: w.GetUid(), Name: w.GetName(), Namespace: w.GetNamespace(), ClusterID: w.GetClusterId(),
				Network: w.GetNetwork(), Addresses: []string{}, TunnelProtocol: w.GetTunnelProtocol().String(),
				Capacity: w.GetCapacity().GetValue(), Services: []string{},
			}
			for _, b := range w.GetAddresses() {
				o.Addresses = append(o.Addresses, ipString(b))
			}
			if g := w.GetNetworkGateway(); g != nil {
				if d := g.GetAddress(); d != nil {
					o.Gateway = d.GetNetwork() + "/" + ipString(d.GetAddress())
				} else if h := g.GetHostname(); h != nil {
					o.Gateway = h.GetNamespace() + "/" + h.GetHostname()
				}
				o.GatewayPort = g.GetHboneMtlsPort()
			}
			for s := range w.GetServices() {
				o.Services = append(o.Services, s)
			}
			sort.Strings(o.Services)
			out.Workloads = append(out.Workloads, o)
		} else if s := a.GetService(); s != nil {
			o := serviceOut{Name: s.GetName(), Namespace: s.GetNamespace(), Hostname: s.GetHostname(), Addresses: []string{}}
			for _, na := range s.GetAddresses() {
				o.Addresses = append(o.Addresses, na.GetNetwork()+"/"+ipString(na.GetAddress()))
			}
			out.Services = append(out.Services, o)
		}
	}
	sort.Slice(out.Workloads, func(i, j int) bool { return out.Workloads[i].UID < out.Workloads[j].UID })
	sort.Slice(out.Services, func(i, j int) bool { return out.Services[i].Hostname < out.Services[j].Hostname })
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
