#!/usr/bin/env bash
# Fuzzes every decoder of bytes a peer can send, one cargo-fuzz target per
# kind (protocol/fuzz/fuzz_targets/), each for SECONDS (default 600), one
# after the other, and prints a line per target: executions, and whether it
# found a crash (kept in protocol/fuzz/artifacts/TARGET/; add each as a
# regression test beside the property tests in protocol/).
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET..]
set -euo pipefail
cd "$(dirname "$0")/../protocol"
seconds="${1:-600}"
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(advert cfp bid award ack result receipt task request response router_outcomes)
fi
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable
# toolchain take them.
export RUSTC_BOOTSTRAP=1
cargo fuzz build --release
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/artifacts/$t.log"
    mkdir -p fuzz/artifacts
    set +e
    cargo fuzz run --release "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo "?")
    if [ $rc -eq 0 ]; then
        echo "$t: $runs executions in ${seconds}s, no crash"
    else
        echo "$t: CRASH (exit $rc) after $(grep -oE '#[0-9]+' "$log" | tail -1): see $log and fuzz/artifacts/$t/"
    fi
done
