"""Drives a mycel node with the real `openai` client; run by the e2e test
`the_openai_client_works_against_the_swarm` (tests/openai.rs).

    python openai_check.py BASE_URL EXPECTED_JSONL TEXTS_FILE

EXPECTED_JSONL holds `mycel infer embed` output for TEXTS_FILE (one JSON
vector per line). Prints one line per check; exits non-zero on failure.
"""

import base64
import json
import math
import struct
import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def metrics(base):
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            samples[key] = s.value
    return samples


def main():
    base, expected_path, texts_path = sys.argv[1:4]
    texts = open(texts_path).read().splitlines()
    expected = [json.loads(line) for line in open(expected_path)]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)

    before = metrics(base)
    print("metrics parse:", len(before), "samples")

    models = {m.id for m in client.models.list()}
    assert {"all-minilm-l6-v2", "smollm2-135m-instruct"} <= models, models
    print("models:", sorted(models))

    # The client asks for base64 by default and decodes it itself.
    got = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert len(got.data) == len(texts), len(got.data)
    worst = min(cosine(d.embedding, e) for d, e in zip(got.data, expected))
    assert worst >= 0.9999, worst
    assert [d.index for d in got.data] == list(range(len(texts)))
    assert got.usage.prompt_tokens > len(texts), got.usage
    print(f"embeddings (base64): {len(got.data)} vectors, worst cosine vs infer {worst:.6f}, usage {got.usage.prompt_tokens}")

    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts[0], encoding_format="float")
    assert cosine(floats.data[0].embedding, expected[0]) >= 0.9999
    print("embeddings (float, one string): ok")

    chat = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=16,
        temperature=0,
    )
    text = chat.choices[0].message.content
    assert text.strip(), chat
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0, chat.usage
    print("chat:", repr(text), chat.choices[0].finish_reason, chat.usage.total_tokens, "tokens")

    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Count from 1 to 5."}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(chunks) >= 3 and streamed.strip(), chunks
    assert finishes in (["stop"], ["length"]), finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    same = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Count from 1 to 5."}], max_tokens=24
    )
    assert same.choices[0].message.content == streamed, (same.choices[0].message.content, streamed)
    print(f"stream: {len(chunks)} chunks, ends with {finishes[0]}, same text as unstreamed")

    try:
        client.embeddings.create(model="no-such-model", input="x")
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        print("unknown model: NotFoundError")

    try:
        client.embeddings.create(model="all-minilm-l6-v2", input=[[1, 2, 3]])
        raise AssertionError("token arrays accepted")
    except openai.BadRequestError:
        print("token arrays: BadRequestError")

    after = metrics(base)
    done = after.get("mycel_tasks{state=done}", 0)
    assert done >= before.get("mycel_tasks{state=done}", 0) + 4, (before, after)
    assert after["mycel_auction_latency_seconds_count"] > before.get("mycel_auction_latency_seconds_count", 0)
    assert after["mycel_bytes_sent_total"] > before["mycel_bytes_sent_total"]
    print(f"metrics moved: tasks done {done:.0f}, auctions {after['mycel_auction_latency_seconds_count']:.0f}")
    print("all ok")


def token_check(base, token):
    """A listener beyond loopback: no token or a wrong one is refused."""
    request = urllib.request.Request(base + "/v1/models")
    try:
        urllib.request.urlopen(request)
        raise AssertionError("no token accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code
        body = json.loads(e.read())
        assert body["error"]["type"] == "authentication_error", body
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    try:
        wrong.models.list()
        raise AssertionError("wrong token accepted")
    except openai.AuthenticationError:
        pass
    right = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    right.models.list()
    print("token: missing 401, wrong AuthenticationError, right ok")


if __name__ == "__main__":
    if sys.argv[1] == "--token":
        token_check(sys.argv[2], sys.argv[3])
    else:
        main()
