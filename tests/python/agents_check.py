"""What agents ask of a node, through the real clients: the `openai` client
(tools, JSON mode, log probabilities, legacy completions, every parameter
honoured or refused), `langchain-openai` (chat, streaming, tool binding,
embeddings) and the `ollama` client against the Ollama routes. Run by the
e2e test `agents_get_tools_json_logprobs_completions_and_ollama`
(tests/interfaces.rs).

    python agents_check.py BASE_URL

The node must see SmolLM2-135M (on two peers), Qwen2.5-Coder-0.5B and
all-MiniLM-L6 in the swarm. Prints one line per check; exits non-zero on failure.
"""

import json
import sys
import time
import urllib.request

import ollama
import openai
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

SMALL = "smollm2-135m-instruct"
CODER = "qwen2.5-coder-0.5b-instruct"
EMBEDDER = "all-minilm-l6-v2"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PET = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}, "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "legs", "kind"],
    "additionalProperties": False,
}


def refused(call, param):
    """`call` must fail with a 400 that names `param`."""
    try:
        call()
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("param") == param or param in str(e), (param, e)
        return str(e)
    raise AssertionError(f"{param}: accepted, neither honoured nor refused")


def openai_checks(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=600)

    # JSON mode: parseable every time, even from a 135M model.
    for prompt in ["Describe a cat.", "List three colours.", "Write a haiku about rain."]:
        r = client.chat.completions.create(
            model=SMALL,
            messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object"},
            max_tokens=40,
            temperature=0,
        )
        value = json.loads(r.choices[0].message.content)
        assert isinstance(value, dict), value
    print("json mode: 3 of 3 answers parse as JSON objects, e.g.", r.choices[0].message.content[:60])

    # JSON schema: the types, the required members, nothing undeclared.
    for prompt in ["Describe a cat.", "Who are you?"]:
        r = client.chat.completions.create(
            model=SMALL, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "pet", "strict": True, "schema": PET}},
        )
        pet = json.loads(r.choices[0].message.content)
        assert set(pet) <= set(PET["properties"]) and isinstance(pet["name"], str), pet
        assert isinstance(pet["legs"], int) and pet["kind"] in ("cat", "dog"), pet
    unsupported = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}}}
    refused(lambda: client.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "Hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": unsupported}}), "pattern")
    print("json schema: answers conform, e.g.", r.choices[0].message.content[:60], "; `pattern` refused by name")

    # Log probabilities, carried in the worker's signed result.
    r = client.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    print(f"logprobs: {len(content)} tokens, first {content[0].token!r} {content[0].logprob:.3f}")

    # Tools, in Qwen2.5's own format; the call comes back parsed.
    r = client.chat.completions.create(model=CODER, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris", call
    print("tools: called", call.function.name, call.function.arguments)
    # ... the result goes back as a `tool` message; the model answers.
    back = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model=CODER, messages=back, tools=[WEATHER], max_tokens=48, temperature=0)
    assert r.choices[0].message.tool_calls is None and "21" in r.choices[0].message.content, r
    print("tools: answer from the result:", repr(r.choices[0].message.content[:60]))
    # Streaming: the call arrives as a tool_calls delta, never as text.
    chunks = list(client.chat.completions.create(
        model=CODER, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0, stream=True))
    streamed_calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_calls and streamed_calls[0].function.name == "get_weather", chunks
    assert "tool_call" not in text and '"name"' not in text, text
    print("tools: streamed as a tool_calls delta")
    # tool_choice: a call even where the model would rather talk.
    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
        r = client.chat.completions.create(
            model=CODER, messages=[{"role": "user", "content": "Tell me a joke about Rome."}], tools=[WEATHER],
            tool_choice=choice, max_tokens=48, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), r
    print("tool_choice required / named: a call every time, e.g.", call.function.arguments)
    # A model without a tool format says so.
    message = refused(lambda: client.chat.completions.create(model=SMALL, messages=ASK, tools=[WEATHER]), "tools")
    assert "no format for tools" in message, message
    print("tools on SmolLM2: refused,", message.split("message': ")[-1][:70])

    # Legacy completions: the prompt continued as it is.
    r = client.completions.create(model=SMALL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  logprobs=2)
    assert "Paris" in r.choices[0].text, r
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=SMALL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text, (streamed, r.choices[0].text)
    two = client.completions.create(model=SMALL, prompt=["One, two,", "Red, green,"], max_tokens=4, n=2)
    assert len(two.choices) == 4
    refused(lambda: client.completions.create(model=SMALL, prompt="x", echo=True), "echo")
    print("completions:", repr(r.choices[0].text), "; streamed the same; 2 prompts x n=2; echo refused")

    # Every documented chat parameter is honoured or refused by name.
    honoured = client.chat.completions.create(
        model=SMALL, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=8, temperature=0.5, top_p=0.9, seed=7, stop=["\n\n"], n=2,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, store=False, service_tier="auto",
        modalities=["text"], parallel_tool_calls=True, tool_choice="none", user="agent-7",
        metadata={"run": "e2e"}, response_format={"type": "text"},
    )
    assert len(honoured.choices) == 2
    refusals = {
        "frequency_penalty": {"frequency_penalty": 0.5},
        "presence_penalty": {"presence_penalty": 1},
        "logit_bias": {"logit_bias": {"50256": -100}},
        "audio": {"audio": {"voice": "alloy", "format": "wav"}},
        "prediction": {"prediction": {"type": "content", "content": "x"}},
        "reasoning_effort": {"reasoning_effort": "low"},
        "web_search_options": {"web_search_options": {}},
        "store": {"store": True},
        "modalities": {"modalities": ["text", "audio"]},
        "tool_choice": {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
                        "tools": [WEATHER]},
        "functions": {"functions": [WEATHER["function"]]},
        "temprature": {"extra_body": {"temprature": 0.2}},
    }
    for param, kwargs in refusals.items():
        refused(lambda: client.chat.completions.create(
            model=SMALL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **kwargs), param)
    refused(lambda: client.embeddings.create(model=EMBEDDER, input="x", dimensions=64), "dimensions")
    print(f"parameters: 20 honoured in one call; {len(refusals) + 1} refused, each by name")


def redundant_checks(base):
    """Two workers answer the same constrained, log-probability-carrying
    task; the requester compares their signed results (tokens exactly, log
    probabilities within 0.5 nats) and accepts."""
    request = {
        "kind": "chat", "inputs": [], "model": SMALL, "redundancy": 2, "json": True, "logprobs": 2, "max_tokens": 24,
        "conversations": [[{"role": "user", "content": "Describe a cat."}], [{"role": "user", "content": "Hi"}]],
    }
    post = urllib.request.Request(base + "/api/v1/tasks", data=json.dumps(request).encode(),
                                  headers={"content-type": "application/json"})
    task = json.load(urllib.request.urlopen(post))["task"]
    started = time.time()
    while True:
        view = json.load(urllib.request.urlopen(f"{base}/api/v1/tasks/{task}"))
        if view["state"] != "running":
            break
        assert time.time() - started < 300, view
        time.sleep(0.3)
    assert view["state"] == "done", view
    for g in view["generations"]:
        assert isinstance(json.loads(g["text"]), dict) and len(g["logprobs"]) == g["tokens"], g
    print("redundancy 2: JSON with log probabilities, both copies agreed; receipt", view["receipt"][:16], "...")


def langchain_checks(base):
    llm = ChatOpenAI(base_url=base + "/v1", api_key="unused", model=SMALL, temperature=0, max_tokens=16,
                     max_retries=0, timeout=600)
    answer = llm.invoke("Name a colour.")
    assert answer.content.strip(), answer
    streamed = "".join(chunk.content for chunk in llm.stream("Name a colour."))
    assert streamed == answer.content, (streamed, answer.content)
    print("langchain chat:", repr(answer.content), "; streamed the same")

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    coder = ChatOpenAI(base_url=base + "/v1", api_key="unused", model=CODER, temperature=0, max_tokens=64,
                       max_retries=0, timeout=600)
    message = coder.bind_tools([get_weather]).invoke("What is the weather like in Paris right now?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather", message
    assert message.tool_calls[0]["args"].get("city") == "Paris", message.tool_calls
    print("langchain bind_tools:", message.tool_calls[0]["name"], message.tool_calls[0]["args"])

    embeddings = OpenAIEmbeddings(base_url=base + "/v1", api_key="unused", model=EMBEDDER,
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["a cat", "a ship"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert len(embeddings.embed_query("rain")) == 384
    print("langchain embeddings: 2 documents and a query, 384 dimensions")


def ollama_checks(base):
    client = ollama.Client(host=base, timeout=600)
    names = {m.model for m in client.list().models}
    assert {SMALL, CODER, EMBEDDER} <= names, names
    assert "tools" in client.show(CODER).capabilities and "tools" not in client.show(SMALL).capabilities
    options = {"temperature": 0, "num_predict": 16}
    chat = client.chat(model=SMALL, messages=[{"role": "user", "content": "Name a colour."}], options=options)
    assert chat.message.content.strip() and chat.done and chat.eval_count > 0, chat
    streamed = "".join(part.message.content for part in client.chat(
        model=SMALL, messages=[{"role": "user", "content": "Name a colour."}], options=options, stream=True))
    assert streamed == chat.message.content, (streamed, chat.message.content)
    print("ollama chat:", repr(chat.message.content), "; streamed the same")

    generated = client.generate(model=SMALL, prompt="The capital of France is", raw=True,
                                options={"temperature": 0, "num_predict": 8})
    assert "Paris" in generated.response, generated
    as_json = client.chat(model=SMALL, messages=[{"role": "user", "content": "Describe a dog."}], format="json",
                          options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(as_json.message.content), dict), as_json.message.content
    as_pet = client.chat(model=SMALL, messages=[{"role": "user", "content": "Describe a dog."}], format=PET,
                         options={"temperature": 0, "num_predict": 40})
    pet = json.loads(as_pet.message.content)
    assert isinstance(pet["legs"], int) and pet["kind"] in ("cat", "dog"), pet
    print("ollama generate (raw):", repr(generated.response), "; format json parses; a schema holds:", pet)

    called = client.chat(model=CODER, messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 64})
    call = called.message.tool_calls[0].function
    assert call.name == "get_weather" and call.arguments["city"] == "Paris", called.message
    print("ollama tools:", call.name, dict(call.arguments))

    vectors = client.embed(model=EMBEDDER, input=["a cat", "a ship"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    try:
        client.chat(model=SMALL, messages=[{"role": "user", "content": "Hi"}], options={"num_ctx": 8192})
        raise AssertionError("num_ctx accepted")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and "num_ctx" in e.error, e
    print("ollama embed: 2 vectors of 384; unsupported options refused by name")


if __name__ == "__main__":
    base = sys.argv[1]
    openai_checks(base)
    redundant_checks(base)
    langchain_checks(base)
    ollama_checks(base)
    print("all ok")
