"""Prefill of several prompts packed into one forward (agent/llama.Llama.prefill) against one
forward per prompt, on the embedded model with float32 weights, as the engine admits them:

- prompts: short ones (brief instructions, a short header and a sample email's first 10 words:
  41-52 tokens) and the sample emails' own (the Northwind instructions: 165-240 tokens);
- N = 1, 4 and 8 prompts, each a different email, into one KV cache (prompt i in slot i);
- adapters: none, one (every prompt the same rank-16 adapter on every projection) or two (the
  prompts alternating between two such adapters, so each prompt is its own run of rows);
- each figure the median of RUNS prefills of the N prompts after a warm-up, one by one and
  packed in turn (per token too: the time over the N prompts' tokens);
- attention: one layer's attention of 8 packed prompts, one causal attention per prompt (what
  agent/kv_cache.prefill_attention runs) against one attention over the pack with a
  block-diagonal causal mask, median of ATTENTION_RUNS.

Run: .venv/bin/python -m bench.prefill   (about 6 minutes on 2 CPU cores)
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from agent.adapters import LoraWeights, pack_lora
from agent.base_model import load_base_model
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.prompt import IncomingEmail, build_messages, prompt_token_ids
from bench.decode import random_adapter
from bench.report import save
from core.settings import Settings
from feedback.samples import load_sample_tenant

COUNTS = (1, 4, 8)
RUNS = 7
ATTENTION_RUNS = 20
MAX_LENGTH = 512


def sample_prompts(tokenizer, count: int) -> dict[str, list[list[int]]]:
    """`count` short prompts and `count` sample-email prompts, each from a different email."""
    sample = load_sample_tenant()
    emails = sample.emails[:count]
    settings = Settings()

    def prompt(instructions: str, email: IncomingEmail) -> list[int]:
        messages = build_messages(instructions, email, quoted_history_chars=settings.quoted_history_chars)
        return prompt_token_ids(tokenizer, messages)

    return {
        "short": [
            prompt("Be brief.", IncomingEmail("a@example.com", "Hi", " ".join(e.body.split()[:10]))) for e in emails
        ],
        "sample": [prompt(sample.instructions, IncomingEmail(e.sender, e.subject, e.body)) for e in emails],
    }


def median_ms(works: dict, runs: int) -> dict[str, float]:
    """Each work's median wall time in ms, the works run in turn (so that the machine's speed
    drifting falls on each alike), after a warm-up of each."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for run in range(runs + 1):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            if run:
                times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}


def time_prefill(llama: Llama, cache: KVCache, prompts: list[list[int]], adapters: list) -> dict:
    tokens = [torch.tensor(prompt) for prompt in prompts]
    lengths = [len(prompt) for prompt in prompts]

    def packed():
        llama.prefill(tokens, pack_lora(adapters, lengths), cache.prefill_attention(list(range(len(tokens))), lengths))

    def one_by_one():
        for slot, (t, adapter) in enumerate(zip(tokens, adapters, strict=True)):
            llama.prefill([t], adapter, cache.prefill_attention([slot], [len(t)]))

    ms = median_ms({"one_by_one_ms": one_by_one, "packed_ms": packed}, RUNS)
    per_token = {f"{name}_per_token": round(value / sum(lengths), 2) for name, value in ms.items()}
    return {"tokens": sum(lengths), **ms, **per_token, "speedup": round(ms["one_by_one_ms"] / ms["packed_ms"], 2)}


def time_attention(llama: Llama, lengths: list[int]) -> dict:
    """One layer's attention of the packed prompts: per prompt against one masked attention."""
    rows = sum(lengths)
    q = torch.randn(1, llama.num_heads, rows, llama.head_dim)
    k, v = (torch.randn(1, llama.num_kv_heads, rows, llama.head_dim) for _ in range(2))
    prompt = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [rows]
    mask = (prompt[:, None] == prompt[None]) & torch.ones(rows, rows, dtype=torch.bool).tril()

    def per_prompt():
        parts = zip(*(t.split(lengths, dim=2) for t in (q, k, v)), strict=True)
        torch.cat([F.scaled_dot_product_attention(*p, is_causal=True, enable_gqa=True) for p in parts], dim=2)

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return {"rows": rows, **median_ms({"per_prompt_ms": per_prompt, "block_diagonal_mask_ms": masked}, ATTENTION_RUNS)}


@torch.inference_mode()
def main() -> None:
    loaded = load_base_model(Settings(model_dtype="float32"))
    llama = Llama(loaded.model, MAX_LENGTH)
    cache = KVCache(llama, max(COUNTS), MAX_LENGTH)
    prompts = sample_prompts(loaded.tokenizer, max(COUNTS))
    folder = Path(tempfile.mkdtemp(prefix="draftloop-prefill-"))
    two = []
    for seed in range(2):
        ref = random_adapter(loaded.model, folder / str(seed), seed=seed)
        ref = type(ref)(seed + 1, ref.path)  # each its own id
        two.append(LoraWeights.load(ref, llama.num_layers, llama.device, llama.dtype))
    figures: dict = {"dtype": "float32", "rank": 16, "runs": RUNS, "prefill": {}, "attention": {}}
    print("prompts N adapters tokens | one-by-one ms (per token) | packed ms (per token) | speedup")
    for kind, texts in prompts.items():
        for count in COUNTS:
            choices = {"none": [None] * count, "one": [two[0]] * count}
            if count > 1:
                choices["two"] = [two[i % 2] for i in range(count)]
            for name, adapters in choices.items():
                e = time_prefill(llama, cache, texts[:count], adapters)
                figures["prefill"][f"{kind} x{count}, {name}"] = e
                print(
                    f"{kind} {count} {name} {e['tokens']} | {e['one_by_one_ms']} ({e['one_by_one_ms_per_token']}) | "
                    f"{e['packed_ms']} ({e['packed_ms_per_token']}) | {e['speedup']}",
                    flush=True,
                )
        figures["attention"][f"{kind} x{max(COUNTS)}"] = time_attention(llama, [len(p) for p in texts])
        print("attention", kind, figures["attention"][f"{kind} x{max(COUNTS)}"], flush=True)
    save("prefill", figures)


if __name__ == "__main__":
    main()
