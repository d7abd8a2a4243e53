#!/usr/bin/env bash
# Market benchmarks for BENCHMARKS.md:
#   1. auction latency (CFP to first award) over many small tasks on a
#      loopback testnet of NODES embedding nodes (default 20);
#   2. throughput vs number of workers, each worker pinned to its own core
#      (taskset), the requester serving no model.
#   bash scripts/bench-market.sh [NODES] [TASKS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust
have taskset || die "taskset (util-linux) is needed to pin workers to cores"
NODES=${1:-20}
TASKS=${2:-200}
step "building mycel (release)"
cargo build --locked --release --bin mycel
BIN=$PWD/target/release/mycel
MODELS=${MYCEL_MODELS_DIR:-$PWD/target/test-models}
"$BIN" models fetch --dir "$MODELS" >/dev/null
DIR=$(mktemp -d)
trap '[ -f "$DIR/net/testnet.json" ] && "$BIN" testnet down --dir "$DIR/net" >/dev/null 2>&1; rm -rf "$DIR"' EXIT

step "auction latency: $NODES nodes, $TASKS tasks of 4 texts, submitted one after another to random nodes"
"$BIN" testnet up --nodes "$NODES" --dir "$DIR/net" --models-dir "$MODELS" --node-models all-minilm-l6-v2 \
  --replicas 1 >/dev/null 2>&1
python3 - "$DIR/net/testnet.json" "$TASKS" <<'PY'
import json, random, sys, time, urllib.request

nodes = json.load(open(sys.argv[1]))["nodes"]
tasks = int(sys.argv[2])

def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)

def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)

deadline = time.time() + 300
while True:
    serving = [p for p in get(nodes[0]["api"] + "/api/v1/peers") if p["models"]]
    if len(serving) >= len(nodes) - 1:
        break
    if time.time() > deadline:
        sys.exit(f"only {len(serving)} peers advertise models")
    time.sleep(1)

random.seed(1)
latencies, walls, bidders = [], [], []
for i in range(tasks):
    node = random.choice(nodes)["api"]
    started = time.time()
    task = post(node + "/api/v1/tasks", {"kind": "embed", "inputs": [f"task {i} text {j}" for j in range(4)]})["task"]
    while True:
        view = get(f"{node}/api/v1/tasks/{task}")
        if view["state"] != "running":
            break
        time.sleep(0.005)
    assert view["state"] == "done", view
    walls.append((time.time() - started) * 1000)
    latencies.append(view["auction_ms"][0])

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

print(f"auction latency (CFP to first award), {tasks} tasks: p50 {pct(latencies, 50)} ms, "
      f"p99 {pct(latencies, 99)} ms, max {max(latencies)} ms")
print(f"whole task (submit to done, 4 texts, as the client saw it): p50 {pct(walls, 50):.0f} ms, "
      f"p99 {pct(walls, 99):.0f} ms")
PY
"$BIN" testnet down --dir "$DIR/net" >/dev/null 2>&1

step "throughput vs workers: 2,000 texts, requester serves no model, each worker pinned to one core"
sample_texts 2000 > "$DIR/texts.txt"
CORES=$(nproc)
printf '%-8s %-10s %-12s %-8s\n' workers seconds texts/s speedup
BASE=
for W in 1 2 4 8; do
  [ "$W" -le "$CORES" ] || { printf '%-8s (needs %s cores; this machine has %s)\n' "$W" "$W" "$CORES"; continue; }
  NM=(--node-models none)
  for _ in $(seq 1 "$W"); do NM+=(--node-models all-minilm-l6-v2); done
  "$BIN" testnet up --nodes $((W + 1)) --dir "$DIR/net" --models-dir "$MODELS" "${NM[@]}" --replicas 1 >/dev/null 2>&1
  # Pin worker i (node-0i, i >= 1) and all its threads to core i-1.
  python3 - "$DIR/net/testnet.json" <<'PY'
import json, subprocess, sys
for i, n in enumerate(json.load(open(sys.argv[1]))["nodes"][1:]):
    subprocess.run(["taskset", "-a", "-cp", str(i), str(n["pid"])], check=True, stdout=subprocess.DEVNULL)
PY
  API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/net/testnet.json")
  for _ in $(seq 1 120); do
    n=$("$BIN" peers --json --node "$API" | python3 -c "import json,sys; print(sum(1 for p in json.load(sys.stdin) if p['models']))")
    [ "$n" -ge "$W" ] && break
    sleep 1
  done
  start=$(date +%s.%N)
  "$BIN" submit embed --input "$DIR/texts.txt" --out "$DIR/out.jsonl" --node "$API" >/dev/null 2>&1
  secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
  [ -n "$BASE" ] || BASE=$secs
  python3 -c "import sys; s=float(sys.argv[1]); print(f'{sys.argv[2]:<8} {s:<10} {2000/s:<12.1f} {float(sys.argv[3])/s:.2f}x')" "$secs" "$W" "$BASE"
  "$BIN" testnet down --dir "$DIR/net" >/dev/null 2>&1
done
