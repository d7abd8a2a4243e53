"""What a user would pick instead of mycel's runtime, measured the same way
as crates/models/benches/models.rs: ONNX Runtime on an ONNX export of the
same all-MiniLM-L6-v2 safetensors, and llama.cpp (llama-cpp-python) on the
same SmolLM2 GGUF. Same texts, same thread count.

    python bench_baselines.py MODELS_DIR THREADS embed|generate

Prints one JSON object.
"""

import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["swarm", "node", "model", "peer", "shard", "gossip", "auction", "vector", "token", "cache", "proof", "result"]


LONG_CONTEXT = 1024  # tokens, as in crates/models/benches/models.rs


def short_texts(n):
    return [f"Sentence {i}: " + " ".join(WORDS[(i * 7 + j * 5) % 12] for j in range(14)) + "." for i in range(n)]


def long_texts(n):
    base = short_texts(7)
    return [f"Document {i}. " + (" ".join(base[i % 7:])) * 2 for i in range(n)]


def rate(items, fn, minimum=3.0):
    fn()
    start = time.perf_counter()
    runs = 0
    while time.perf_counter() - start < minimum or runs < 2:
        fn()
        runs += 1
    return items * runs / (time.perf_counter() - start)


def onnx_export(folder, path):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            path,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
            opset_version=14,
        )


def embeddings(models, threads, out):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    folder = os.path.join(models, "all-minilm-l6-v2")
    onnx_path = os.path.join(os.environ.get("MYCEL_BENCH_TMP", "/tmp"), "all-minilm-l6-v2.onnx")
    if not os.path.exists(onnx_path):
        onnx_export(folder, onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def embed(texts):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]}
        hidden = session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    for name, texts in [("short", short_texts(32)), ("long", long_texts(32))]:
        out[f"{name}_tokens"] = sum(len(tokenizer(t)["input_ids"]) for t in texts) / len(texts)
        out[f"embed_{name}_b1_per_s"] = rate(8, lambda: [embed([t]) for t in texts[:8]])
        out[f"embed_{name}_b32_per_s"] = rate(32, lambda: embed(texts))
        print(f"onnxruntime {name}: b1 {out[f'embed_{name}_b1_per_s']:.1f}/s b32 {out[f'embed_{name}_b32_per_s']:.1f}/s", file=sys.stderr)
    out["onnxruntime"] = ort.__version__


def generation(models, threads, out):
    import llama_cpp

    # MYCEL_BENCH_GGUF: another model folder (as the mycel bench takes it).
    model = os.environ.get("MYCEL_BENCH_GGUF", "smollm2-135m-instruct")
    folder = os.path.join(models, model)
    gguf = os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    out["generation_model"] = model
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    system = (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        if model == "smollm2-135m-instruct"
        else "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    prompt = (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{long_texts(1)[0]}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)[:128]

    def prefill():
        llm.reset()
        llm.eval(ids)

    out["prefill_prompt_tokens"] = len(ids)
    out["prefill_tokens_per_s"] = rate(len(ids), prefill)
    prefill()
    steps = 64
    start = time.perf_counter()
    for i in range(steps):
        llm.eval([ids[i % len(ids)]])
    out["decode_tokens_per_s"] = steps / (time.perf_counter() - start)
    # A long context (the same ids repeated, as mycel's bench does), fed at
    # once, then decode steps at that depth.
    # Its own context (the short figures above keep n_ctx = 512, as before).
    del llm
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=LONG_CONTEXT + 128, n_threads=threads, n_threads_batch=threads, n_batch=LONG_CONTEXT, verbose=False
    )
    long_ids = (ids * (LONG_CONTEXT // len(ids) + 1))[:LONG_CONTEXT]
    start = time.perf_counter()
    llm.eval(long_ids)
    out["prefill_long_tokens_per_s"] = len(long_ids) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(steps):
        llm.eval([ids[i % len(ids)]])
    out["decode_long_tokens_per_s"] = steps / (time.perf_counter() - start)
    out["long_context_tokens"] = LONG_CONTEXT
    print(
        f"llama.cpp, {LONG_CONTEXT}-token context: prefill {out['prefill_long_tokens_per_s']:.1f} tok/s, "
        f"then decode {out['decode_long_tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
    )
    out["llama_cpp_python"] = llama_cpp.__version__
    print(f"llama.cpp: prefill {out['prefill_tokens_per_s']:.1f} tok/s decode {out['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    models_dir, threads, which = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    result = {"threads": threads}
    if which == "embed":
        embeddings(models_dir, threads, result)
    else:
        generation(models_dir, threads, result)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
