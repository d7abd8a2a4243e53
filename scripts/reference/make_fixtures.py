"""Writes the faithfulness fixtures mycel's model tests compare against.

Run it through scripts/reference/make-fixtures.sh, which sets up the
reference implementations (sentence-transformers on Debian's CPU torch,
llama.cpp through llama-cpp-python) and fetches the models first.

    python make_fixtures.py MODELS_DIR OUT_DIR

Writes OUT_DIR/embeddings.json, OUT_DIR/smollm2-tokens.json and
OUT_DIR/smollm2-greedy.json.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LONG = " ".join(
    f"Sentence {i} of a long document about distributed systems, where nodes gossip adverts and auction shards."
    for i in range(40)
)

EMBED_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    " ",
    "",
    "?!",
    "12345 67890",
    "Peer-to-peer networks route around failures.",
    "Machine learning models can be small and still useful.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Größere Modelle sind nicht immer besser.",
    "東京は日本の首都です。",
    "机器学习模型可以在边缘设备上运行。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "🦀 Rust is fun 🚀🚀",
    "naïve café résumé",
    "UPPER CASE AND lower case",
    "tabs\tand\nnewlines\r\nmixed",
    "https://example.com/path?query=1&x=2",
    "def f(x):\n    return x * 2",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    LONG,
    "word " * 300,
]

TOKEN_TEXTS = [
    "Hello world",
    " Hello world",
    "hello",
    "  two leading spaces",
    "trailing spaces   ",
    "Numbers: 1234567890 and 3.14159",
    "2024-11-23T18:48:24Z",
    "I'm sure you'll see they've done it, we'd go.",
    "CAPS and MiXeD CaSe",
    "naïve café résumé",
    "東京は日本の首都です。",
    "Привет, мир!",
    "🦀 emoji 🚀🚀 and ZWJ 👩‍💻",
    "tabs\tand\nnewlines\r\n\n\nthree",
    "code: fn main() { println!(\"hi\"); }",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "a<|im_end|>b <|im_start|> c",
    "!!!???...,,,;;;",
    "x" * 50,
    "\u00a0non-breaking\u2009thin space",
    "",
]

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a peer-to-peer network is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a short tip for writing clean code.",
    "Who wrote Romeo and Juliet?",
]


def chatml(user):
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embeddings(models, out):
    from sentence_transformers import SentenceTransformer
    import sentence_transformers

    folder = os.path.join(models, "all-minilm-l6-v2")
    model = SentenceTransformer(folder, device="cpu")
    vectors = model.encode(EMBED_TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    lengths = [len(model.tokenizer(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in EMBED_TEXTS]
    fixture = {
        "reference": f"sentence-transformers {sentence_transformers.__version__}",
        "weights_sha256": sha256(os.path.join(folder, "model.safetensors")),
        "max_seq_length": model.max_seq_length,
        "texts": EMBED_TEXTS,
        "token_counts": lengths,
        "vectors": [[float(f"{x:.8g}") for x in v] for v in vectors.tolist()],
    }
    with open(os.path.join(out, "embeddings.json"), "w") as f:
        json.dump(fixture, f, ensure_ascii=False)


def generation(models, out):
    import llama_cpp
    import numpy as np

    folder = os.path.join(models, "smollm2-135m-instruct")
    gguf = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    reference = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"

    vocab = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    tokens = {
        "reference": reference,
        "weights_sha256": sha256(gguf),
        "cases": [
            {"text": t, "ids": vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TOKEN_TEXTS
        ],
    }
    with open(os.path.join(out, "smollm2-tokens.json"), "w") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for user in GREEDY_PROMPTS:
        prompt = chatml(user)
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        steps = []
        for _ in range(20):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits)
            top = [{"token": int(t), "logit": float(logits[t])} for t in order[:5]]
            steps.append({"token": top[0]["token"], "top": top})
            llm.eval([top[0]["token"]])
        cases.append({"user": user, "prompt": prompt, "prompt_ids": ids, "steps": steps})
    greedy = {"reference": reference, "weights_sha256": sha256(gguf), "cases": cases}
    with open(os.path.join(out, "smollm2-greedy.json"), "w") as f:
        json.dump(greedy, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    embeddings(models_dir, out_dir)
    generation(models_dir, out_dir)
    print(f"fixtures written to {out_dir}")
