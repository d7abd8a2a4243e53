#!/usr/bin/env bash
# Swarm benchmarks for BENCHMARKS.md: convergence of real node processes
# (mycel testnet up) and idle memory per node, then the in-process swarm.
#   bash scripts/bench-swarm.sh [NODES...]     (default: 10 30 50 60)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust
step "building mycel (release)"
cargo build --locked --release --bin mycel
BIN=$PWD/target/release/mycel
DIR=$(mktemp -d)
trap '[ -f "$DIR/net/testnet.json" ] && "$BIN" testnet down --dir "$DIR/net" >/dev/null 2>&1; rm -rf "$DIR"' EXIT

printf '\n%-6s %-28s %-14s %-14s\n' nodes "converged after last start" "idle RSS avg" "idle RSS max"
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10 30 50 60)
for m in "${SIZES[@]}"; do
  {
    out=$("$BIN" testnet up --nodes "$m" --dir "$DIR/net" --advert-interval 10s --no-models 2>&1 >/dev/null)
    conv=$(sed -nE 's/.*converged ([0-9.]+s) after the last one started.*/\1/p' <<<"$out")
    sleep 10 # idle: let start-up allocations settle
    rss=$(python3 - "$DIR/net/testnet.json" <<'PY'
import json, sys
pids = [n["pid"] for n in json.load(open(sys.argv[1]))["nodes"]]
kb = []
for p in pids:
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmRSS:"):
            kb.append(int(line.split()[1]))
print(f"{sum(kb)/len(kb)/1024:.1f}MiB {max(kb)/1024:.1f}MiB")
PY
)
    read -r avg max <<<"$rss"
    printf '%-6s %-28s %-14s %-14s\n' "$m" "$conv" "$avg" "$max"
    "$BIN" testnet down --dir "$DIR/net" >/dev/null 2>&1
  }
done

step "in-process swarm"
cargo bench --locked -p mycel-net --bench convergence -- 50 100 200
# The same 200 with a longer advert interval: on 2 cores, 200 nodes'
# periodic adverts alone are a large part of the CPU (see BENCHMARKS.md).
MYCEL_BENCH_ADVERT_INTERVAL_S=60 cargo bench --locked -p mycel-net --bench convergence -- 200
