#!/usr/bin/env bash
# Model speed, mycel beside the baselines, same machine, same run, same
# thread count (default 2): ONNX Runtime for embeddings, llama.cpp for
# generation. Results go to stdout as JSON lines; BENCHMARKS.md has them.
#   bash scripts/bench-models.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust

threads="${1:-2}"
models="${MYCEL_TEST_MODELS:-$PWD/target/test-models}"
venv="$(bash scripts/reference/setup.sh | tail -1)"
cargo build --locked --release -p mycel-node
target/release/mycel models fetch --dir "$models"
cargo bench --locked -p mycel-models --bench models --no-run

step "mycel (candle), $threads threads"
CANDLE_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
  cargo bench --locked -q -p mycel-models --bench models -- "$models"
step "mycel (candle), $threads single-threaded replicas (the node's default), and one model on 1 thread"
CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 MYCEL_BENCH_REPLICAS="$threads" MYCEL_BENCH_EMBED_ONLY=1 \
  cargo bench --locked -q -p mycel-models --bench models -- "$models"
step "ONNX Runtime, $threads threads"
OMP_NUM_THREADS="$threads" "$venv/bin/python" scripts/reference/bench_baselines.py "$models" "$threads" embed
step "ONNX Runtime, 1 thread"
OMP_NUM_THREADS=1 "$venv/bin/python" scripts/reference/bench_baselines.py "$models" 1 embed
step "llama.cpp, $threads threads"
"$venv/bin/python" scripts/reference/bench_baselines.py "$models" "$threads" generate
