#!/usr/bin/env bash
# Wall time to summarise a whole novel through the swarm (map-reduce,
# `mycel submit summarize`) with 1, 2 and 4 worker nodes, for
# BENCHMARKS.md. The text: one of Jane Austen's six novels (public domain)
# from Debian's r-cran-janeaustenr, read out of R's lazy-load format by
# scripts/austen.py. Each testnet: one requester serving no model, and W
# workers serving SmolLM2-135M, each one replica on one thread (a
# worker = one core's worth of a spare machine).
#   bash scripts/bench-summarize.sh [NOVEL] [WORKERS ...]   (default: northangerabbey 1 2 4)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust

novel="${1:-northangerabbey}"
shift || true
WORKERS=("$@")
[ ${#WORKERS[@]} -gt 0 ] || WORKERS=(1 2 4)
models="${MYCEL_TEST_MODELS:-$PWD/target/test-models}"
work="$PWD/target/austen"
mkdir -p "$work"

release_with_models "$models"

step "fetching Jane Austen's novels (Debian's r-cran-janeaustenr 1.0.0-1, sha256-checked)"
deb="$work/r-cran-janeaustenr_1.0.0-1_all.deb"
if [ ! -f "$deb" ]; then
  have apt-get || die "needs apt-get to fetch Debian's r-cran-janeaustenr (or put $deb there by hand)"
  (cd "$work" && apt-get download -q r-cran-janeaustenr=1.0.0-1 2>/dev/null) ||
    { [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null && (cd "$work" && apt-get download -q r-cran-janeaustenr=1.0.0-1); } ||
    die "apt-get download r-cran-janeaustenr=1.0.0-1 failed"
fi
echo "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95  $deb" | sha256sum -c --quiet - ||
  die "$deb is not the pinned package"
rm -rf "$work/pkg" && dpkg-deb -x "$deb" "$work/pkg"
text="$work/$novel.txt"
python3 scripts/austen.py "$work/pkg/usr/lib/R/site-library/janeaustenr/data" "$novel" "$text"
echo "$novel: $(wc -c <"$text") bytes, $(wc -w <"$text") words"

net="$work/net"
[ -f "$net/testnet.json" ] && "$BIN" testnet down --dir "$net" >/dev/null 2>&1 || true
trap '"$BIN" testnet down --dir "$net" >/dev/null 2>&1 || true' EXIT
rows=()
for w in "${WORKERS[@]}"; do
  step "$w worker(s)"
  node_models=(--node-models none)
  for _ in $(seq "$w"); do node_models+=(--node-models smollm2-135m-instruct); done
  "$BIN" testnet up --nodes $((w + 1)) --dir "$net" --advert-interval 2s --models-dir "$models" "${node_models[@]}" >/dev/null
  api=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$net/testnet.json")
  start=$(date +%s.%N)
  "$BIN" submit summarize --node "$api" --input "$text" --model smollm2-135m-instruct --out "$work/summary-$w.txt" 2>"$work/summary-$w.log"
  end=$(date +%s.%N)
  row=$(python3 - "$net/testnet.json" "$start" "$end" "$w" "$work/summary-$w.log" <<'PY'
import json, sys, urllib.request
nodes = json.load(open(sys.argv[1]))["nodes"]
wall = float(sys.argv[3]) - float(sys.argv[2])
shards, seconds = [], 0.0
for n in nodes[1:]:
    text = urllib.request.urlopen(n["api"] + "/metrics", timeout=10).read().decode()
    done = 0
    for line in text.splitlines():
        if line.startswith("mycel_shards_executed_total"):
            done += int(float(line.rsplit(" ", 1)[1]))
        if line.startswith("mycel_inference_seconds_total{"):
            seconds += float(line.rsplit(" ", 1)[1])
    shards.append(done)
stages = next((l.split(": ", 1)[1].strip() for l in open(sys.argv[5]) if l.rstrip().endswith("levels")), "?")
print(f"| {sys.argv[4]} | {wall:.0f} s | {seconds:.0f} s | {' / '.join(map(str, shards))} | {stages} |")
PY
)
  echo "$row"
  rows+=("$row")
  "$BIN" testnet down --dir "$net" >/dev/null
done

step "summary ($novel, $(nproc) cores: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1))"
echo "| workers | wall time | inference seconds (all workers) | shards per worker | stages |"
echo "| ---: | ---: | ---: | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "summaries: $work/summary-*.txt"
