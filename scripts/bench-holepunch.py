#!/usr/bin/env python3
"""Hole punching between two homes behind NAT, over many rounds and NAT kinds.

Each round starts a fresh 3-node testnet in network namespaces
(`mycel testnet up --nat A,B`): node-00 public (bootstrap and relay),
node-01 behind a router of kind A (the requester, no models), node-02 behind
one of kind B (the embedder). Once node-01 knows node-02's relayed address it
submits a small embedding task to it, then the round records whether the task
completed and how the two are connected afterwards: `direct` (hole punched;
the relayed connection is closed then), `relayed` (punching failed, the
relay carries the traffic) or `dialled` (the worker was found reachable
without a relay, as behind a full cone, and dialled directly).

    sudo python3 scripts/bench-holepunch.py [--rounds N] [--pairs A:B ...] [--bin PATH]

Needs root, iptables, and the models under target/test-models (as the tests).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["full-cone", "port-restricted", "symmetric"]


def get(node, path):
    req = urllib.request.Request(node["api"] + path)
    if node.get("api_token"):
        req.add_header("Authorization", "Bearer " + node["api_token"])
    with urllib.request.urlopen(req, timeout=3) as r:
        return json.load(r)


def peer(node, peer_id):
    try:
        return next((p for p in get(node, "/api/v1/peers") if p["peer_id"] == peer_id), None)
    except OSError:
        return None


def wait(what, limit, check):
    started = time.time()
    while time.time() - started < limit:
        if check():
            return True
        time.sleep(0.2)
    print(f"    ({what}: not after {limit} s)", file=sys.stderr)
    return False


def one_round(bin_, models, pair, texts, keep_failed=False):
    tmp = tempfile.mkdtemp(prefix="mycel-punch-")
    net = os.path.join(tmp, "net")
    up = [bin_, "testnet", "up", "--nodes", "3", "--nat", ",".join(pair), "--dir", net,
          "--models-dir", models, "--advert-interval", "2s",
          "--node-models", "none", "--node-models", "none", "--node-models", "all-minilm-l6-v2"]
    try:
        subprocess.run(up, check=True, capture_output=True)
        manifest = json.load(open(os.path.join(net, "testnet.json")))
        token = manifest["netns"]["api_token"]
        for n in manifest["nodes"]:
            n["api_token"] = token
        requester, worker = manifest["nodes"][1], manifest["nodes"][2]

        def reach(node):
            try:
                return get(node, "/api/v1/status")["reachability"]
            except OSError:
                return {}

        def knows_dialable(node, other):
            # `other`'s advert, as `node` holds it, has an address on the
            # "internet" (198.18.*): its router's (public) or its relay's.
            p = peer(node, other["peer_id"])
            return p is not None and any(a.startswith("/ip4/198.18.") for a in p["listen_addrs"])

        def ready():
            # Both homes know whether they are reachable (AutoNAT), and each
            # holds an advert of the other with an address it can dial: the
            # rate is measured on settled nodes, not on a start-up race.
            p = peer(requester, worker["peer_id"])
            if p is None or not p["models"]:
                return False
            if any(reach(n).get("reach") not in ("public", "private") for n in (requester, worker)):
                return False
            return knows_dialable(requester, worker) and knows_dialable(worker, requester)

        if not wait("the worker's reachability", 90, ready):
            return "not ready"
        time.sleep(2)  # the adverts that follow the last AutoNAT verdict
        out = os.path.join(tmp, "out.jsonl")
        env = dict(os.environ, MYCEL_API_TOKEN=token)
        done = subprocess.run([bin_, "submit", "embed", "--input", texts, "--out", out, "--items-per-shard", "25",
                               "--node", requester["api"]], env=env, capture_output=True)
        if done.returncode != 0:
            if keep_failed:
                print(f"    kept for a look: {net}", file=sys.stderr)
                net = None
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            return f"task failed ({why[0]})"
        # DCUtR tries three times within a few seconds of the relayed
        # connection opening; give it time to settle.
        wait("a direct connection", 8, lambda: (peer(requester, worker["peer_id"]) or {}).get("connection") == "direct")
        how = (peer(requester, worker["peer_id"]) or {}).get("connection", "")
        punched = sum(reach(n).get("hole_punches_ok", 0) for n in (requester, worker))
        failed = sum(reach(n).get("hole_punches_failed", 0) for n in (requester, worker))
        if how == "direct":
            return "direct" if punched else "dialled"
        if "relayed" in how:
            # Whether DCUtR tried and gave up, or never tried: the relayed
            # counts either way (the work went through the relay).
            print(f"    relayed: {failed} failed punch attempts reported", file=sys.stderr)
            return "relayed"
        return f"other ({how!r})"
    finally:
        if net:
            subprocess.run([bin_, "testnet", "down", "--dir", net], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--pairs", nargs="*", default=[f"{a}:{b}" for i, a in enumerate(KINDS) for b in KINDS[i:]])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "mycel"))
    ap.add_argument("--models", default=os.path.join(ROOT, "target", "test-models"))
    ap.add_argument("--keep-failed", action="store_true", help="leave a failed round's testnet up, to look at")
    args = ap.parse_args()
    texts = os.path.join(tempfile.mkdtemp(prefix="mycel-punch-"), "texts.txt")
    with open(texts, "w") as f:
        f.write("\n".join(f"punch text {i}: small models behind routers" for i in range(100)))

    print(f"hole punching between two homes, {args.rounds} rounds per pair ({args.bin})")
    print(f"{'home A':>16} {'home B':>16} {'punched':>8} {'relayed':>8} {'dialled':>8} {'failed':>7}  punch rate")
    for pair in args.pairs:
        a, b = pair.split(":")
        counts = {}
        for r in range(args.rounds):
            outcome = one_round(args.bin, args.models, (a, b), texts, args.keep_failed)
            counts[outcome] = counts.get(outcome, 0) + 1
            print(f"    {a} / {b} round {r + 1}: {outcome}", file=sys.stderr)
        direct, relayed, dialled = (counts.get(k, 0) for k in ("direct", "relayed", "dialled"))
        for outcome, n in sorted(counts.items()):
            if outcome not in ("direct", "relayed", "dialled"):
                print(f"    {a} / {b}: {n} x {outcome}", file=sys.stderr)
        failed = args.rounds - direct - relayed - dialled
        tried = direct + relayed
        rate = f"{direct / tried:.0%} of {tried}" if tried else "-"
        print(f"{a:>16} {b:>16} {direct:>8} {relayed:>8} {dialled:>8} {failed:>7}  {rate}", flush=True)


if __name__ == "__main__":
    main()
