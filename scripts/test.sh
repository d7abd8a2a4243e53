#!/usr/bin/env bash
# The whole test suite, from a fresh clone. Installs what it needs.
#   bash scripts/test.sh [extra args for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust
need_disk 4
# The end-to-end tests run the real `mycel` binary: build it with the same
# profile as the tests.
step "building mycel"
cargo build --locked --workspace --bins
# The model tests run the real models (checked against committed fixtures):
# fetch them once into target/test-models; later runs find them present.
export MYCEL_TEST_MODELS="${MYCEL_TEST_MODELS:-$PWD/target/test-models}"
step "fetching test models into $MYCEL_TEST_MODELS"
target/debug/mycel models fetch --dir "$MYCEL_TEST_MODELS"
step "installing the openai, langchain-openai and ollama clients, chromium for the interface tests, iptables for the network ones"
need_test_python
need_chromium
need_iptables
step "running the test suite"
if have cargo-nextest; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  echo "(cargo-nextest not found; using cargo test)"
  cargo test --locked --workspace --no-fail-fast "$@"
fi
