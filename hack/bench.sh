#!/usr/bin/env bash
# Benchmarks meshfed against local clusters: convergence time, writes to converge, writes of a steady state, memory.
# Usage: hack/bench.sh [--members N] [--resyncs K] [--ambient] (--help lists every option)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p meshfed-operator -p meshfed-e2e --bin meshfed --bin meshfed-bench
exec target/release/meshfed-bench "$@"
