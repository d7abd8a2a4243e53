#!/usr/bin/env bash
# mycel's main job, from a fresh clone. Installs what it needs.
#   bash scripts/demo.sh
# Today: builds mycel, starts a local swarm of real node processes, shows
# what each node sees, crashes one and shows the swarm notice, then stops
# it. Models and the task market (real work through the swarm) come next.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust
step "building mycel (release, tuned for this CPU by .cargo/config.toml; the first build takes several minutes)"
cargo build --locked --release --bin mycel
MYCEL=$PWD/target/release/mycel
DIR=${MYCEL_DEMO_DIR:-$PWD/.demo}
NODES=${MYCEL_DEMO_NODES:-5}
[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR" >/dev/null 2>&1 || true
trap '[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR"' EXIT

step "starting a local swarm of $NODES nodes in $DIR"
"$MYCEL" testnet up --nodes "$NODES" --dir "$DIR" --advert-interval 1s

API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
step "node-00 describes itself (mycel status --node $API)"
"$MYCEL" status --node "$API"
step "the peers node-00 knows from their signed adverts (mycel peers)"
"$MYCEL" peers --node "$API"

VICTIM=$(python3 -c "import json,sys;n=json.load(open(sys.argv[1]))['nodes'][-1];print(n['pid'], n['peer_id'])" "$DIR/testnet.json")
step "crashing the last node (kill -9 ${VICTIM% *}); the others drop it when its advert expires (3 s)"
kill -9 "${VICTIM% *}"
sleep 4.5
"$MYCEL" peers --node "$API"

step "stopping the swarm"
"$MYCEL" testnet down --dir "$DIR"
trap - EXIT
