#!/usr/bin/env python3
"""Routing overhead of mycel/auto inside real requests: the evaluation's
held-out prompts (every other one, code and trivia in their proportions)
sent as routed chat requests, each after the last one's generation (which
pushes the embedder's weights out of the caches), reading overhead_ms
from each task's record. The router first learns the training half's
outcomes from the evaluation journal, as scripts/eval.py does.
Generations are cut at --max-tokens (the routing happens before the
first token; a shorter answer only makes the run shorter).

    python3 scripts/bench-route-inside.py --api http://127.0.0.1:PORT \
        --data target/eval/data --journal target/eval/answers-164-260.jsonl

Needs a testnet as scripts/eval.sh starts one.
"""
import argparse, importlib.util, json, os, random, sys

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("mycel_eval", os.path.join(here, "eval.py"))
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--api", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--journal", required=True)
ap.add_argument("--max-tokens", type=int, default=8)
ap.add_argument("--every", type=int, default=2, help="ask every n-th held-out prompt")
ap.add_argument("--cost-weight", type=float, default=0.1)
args = ap.parse_args()

items = ev.load_humaneval(args.data, 164) + ev.load_trivia(args.data, 260)
random.Random(7).shuffle(items)
train, test = items[0::2], items[1::2]
rows = {}
with open(args.journal) as f:
    for line in f.read().splitlines()[1:]:
        j = json.loads(line)
        rows[(j["config"], j["item"])] = j["row"]
models = sorted(
    {m["id"] for m in json.loads(ev.get(f"{args.api}/v1/models"))["data"] if m["kind"] == "generation"}
    - {"mycel/auto", "mycel/vote", "mycel/best-of", "mycel/moa"}
)
for item in train:
    for m in models:
        r = rows.get((m, item["id"]))
        if r is not None:
            ev.post(f"{args.api}/api/v1/router/outcomes", {"prompt": item["prompt"], "model": m, "score": r["score"]})

by_kind = {"code": [], "trivia": []}
for k, item in enumerate(test[:: args.every]):
    body = {
        "model": "mycel/auto",
        "cost_weight": args.cost_weight,
        "max_tokens": min(item["max_tokens"], args.max_tokens),
        "messages": [{"role": "user", "content": item["prompt"]}],
    }
    reply = ev.post(f"{args.api}/v1/chat/completions", body)
    task = reply["id"].removeprefix("chatcmpl-")
    view = json.loads(ev.get(f"{args.api}/api/v1/tasks/{task}"))
    by_kind[item["kind"]].append(view["route"]["decision"]["overhead_ms"])
    if k % 20 == 19:
        print(f"  {k + 1} requests", file=sys.stderr, flush=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


everything = by_kind["code"] + by_kind["trivia"]
out = {"requests": len(everything)}
for name, xs in [("all", everything), ("code", by_kind["code"]), ("trivia", by_kind["trivia"])]:
    out[name] = {"n": len(xs), "p50_ms": round(pct(xs, 50), 2), "p90_ms": round(pct(xs, 90), 2)}
print(json.dumps(out))
