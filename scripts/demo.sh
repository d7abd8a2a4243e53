#!/usr/bin/env bash
# mycel's main job, from a fresh clone. Installs what it needs.
#   bash scripts/demo.sh
# Today: builds mycel and creates this node's identity. As the swarm,
# models and market land, this grows into a local swarm doing real work.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust
step "building mycel (release, tuned for this CPU; first build takes a few minutes)"
RUSTFLAGS="${RUSTFLAGS:--C target-cpu=native}" cargo build --locked --release --bin mycel
DATA=${MYCEL_DEMO_DIR:-$PWD/.demo}
step "this node's identity (key in $DATA/node)"
./target/release/mycel id --data-dir "$DATA/node"
cat <<MSG

This node's PeerId is above; its secret key is $DATA/node/node.key (mode 0600).
The swarm itself (mycel node, testnet, submit) is not built yet: see the
README's status section.
MSG
