#!/usr/bin/env python3
"""Routing overhead of mycel/auto on a running node: N calls to
POST /api/v1/router/choose with varied prompts, percentiles of the
node's own overhead_ms (embedding the prompt + scoring the candidates).

    python3 scripts/bench-route.py http://127.0.0.1:PORT 400

The node must serve an embedding model and see generation models.
"""
import json, sys, urllib.request, random, statistics
api = sys.argv[1]; n = int(sys.argv[2])
random.seed(7)
subjects = ["the capital of France", "a binary search in Python", "photosynthesis", "the French revolution",
            "a function that reverses a linked list", "quicksort", "the speed of light", "prime numbers",
            "how vaccines work", "a SQL query joining two tables", "the Pythagorean theorem", "a regex for emails"]
def prompt(i):
    s = random.choice(subjects)
    base = random.choice(["What is {}?", "Explain {} briefly.", "Write code for {}.", "Tell me about {} in detail, with examples."]).format(s)
    return base + (" Please be precise." * random.randint(0, 12))
def choose(p):
    body = json.dumps({"kind": "chat", "inputs": [], "conversations": [[{"role": "user", "content": p}]]}).encode()
    req = urllib.request.Request(api + "/api/v1/router/choose", data=body, headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())
for i in range(10): choose(prompt(i))  # warm-up
o = sorted(choose(prompt(i))["overhead_ms"] for i in range(n))
pct = lambda q: o[min(len(o) - 1, int(q / 100 * len(o)))]
print(json.dumps({"calls": n, "p50_ms": round(pct(50), 2), "p90_ms": round(pct(90), 2), "p99_ms": round(pct(99), 2), "max_ms": round(o[-1], 2), "mean_ms": round(statistics.mean(o), 2)}))
