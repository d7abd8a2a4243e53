#!/usr/bin/env bash
# Regenerates the faithfulness fixtures in crates/models/tests/fixtures from
# the reference implementations. Commit the result with the reason.
#   bash scripts/reference/make-fixtures.sh [embeddings|smollm2|paraphrase|qwen ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
need_rust

venv="$(bash scripts/reference/setup.sh | tail -1)"
models="${MYCEL_TEST_MODELS:-$PWD/target/test-models}"
cargo build --locked -p mycel-node
target/debug/mycel models fetch --dir "$models"
step "running the references"
"$venv/bin/python" scripts/reference/make_fixtures.py "$models" crates/models/tests/fixtures "$@"
