"""Single-stream decode of the embedded model in float32: the engine with its base weights held in
each format (float, int8, int4) against plain `generate`, against the memory-bandwidth ceiling of
that format measured in the same run; llama.cpp on the same GGUF as an outside anchor; adapter
load and switch times.

- bandwidth: the best of several passes reading a 1 GiB tensor (torch sum, all threads);
- ceiling: bandwidth / bytes of base weights read per decoded token in the format (every
  projection of every layer plus the LM head, with the int formats' scales);
- decode tokens/s: 128 new tokens after a sample email's prompt, timed from the first new token to
  the last (prefill reported apart), median of 5; base model and with a rank-16 adapter on every
  projection; the same prompt through `generate` in float32 (through PEFT for the adapter), whose
  tokens the float engine's are checked against (the quantized formats' in bench.quantized);
- llama.cpp (`make llama-cpp`): the embedded Q4_1 GGUF, 2 threads, greedy, the same prompt ids;
- adapter load (cold: read and prepared) and switch (cached: a batch whose adapter changed);
- where the CPU computes in bfloat16 natively (`auto` resolves to it), the server's default there:
  `float` weights of the model loaded in bfloat16 (`float_bfloat16`), against its own ceiling.

Run: .venv/bin/python -m bench.decode   (about 5 minutes on 2 CPU cores)
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from agent.adapters import AdapterCache, AdapterRef, attach
from agent.base_model import load_base_model, resolve_dtype
from agent.drafting import Drafter, generate_greedy
from agent.engine import PLAIN_GREEDY
from agent.prompt import IncomingEmail, pad_token_id
from agent.threads import in_fresh_thread
from bench.report import save
from core.settings import Settings
from feedback.samples import load_sample_tenant

RUNS = 5
NEW_TOKENS = 128


def bandwidth_gb_s() -> float:
    data = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> int:
    """Every weight a decode step reads. The embedding table is read one row at a time, but
    SmolLM2 ties it to the LM head, which is read whole (tied weights are listed once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        embed = model.get_input_embeddings().weight
        total -= embed.numel() * embed.element_size()
    return total


def random_adapter(model, folder: Path, seed: int = 0) -> AdapterRef:
    """A rank-16 adapter on every projection, shaped as training makes them (values are random)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    shell = get_peft_model(AutoModelForCausalLM.from_config(model.config), lora)
    for name, parameter in shell.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    shell.save_pretrained(folder)
    return AdapterRef(1, folder)


def time_engine(drafter: Drafter, prompt: list[int], adapter) -> dict:
    drafter.backend.stop_ids = set()  # always NEW_TOKENS tokens, for timing
    runs = []
    for _ in range(RUNS + 1):  # the first is a warm-up
        stream = drafter.submit(prompt, max_new_tokens=NEW_TOKENS, adapter=adapter)
        stream.result()
        runs.append(stream)
    runs = runs[1:]
    decode = statistics.median((s.finished_at - s.first_token_at) / (NEW_TOKENS - 1) for s in runs)
    prefill = statistics.median(s.first_token_at - s.submitted_at for s in runs)
    return {"decode_tokens_per_s": round(1 / decode, 1), "prefill_s": round(prefill, 3)}


def time_generate(model, prompt: list[int], pad_id: int) -> dict:
    """Plain generate, decode only: a 1-token generate gives the prefill, subtracted."""

    def run(n: int) -> float:
        started = time.perf_counter()
        model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
        )
        return time.perf_counter() - started

    run(4)
    prefill = statistics.median(run(1) for _ in range(RUNS))
    whole = statistics.median(run(NEW_TOKENS) for _ in range(RUNS))
    return {"decode_tokens_per_s": round((NEW_TOKENS - 1) / (whole - prefill), 1), "prefill_s": round(prefill, 3)}


def same_tokens(drafter: Drafter, model, prompt: list[int], adapter, stops: list[int]) -> bool:
    """The engine's greedy draft (with its real stop tokens) against generate's."""
    drafter.backend.stop_ids = set(stops)
    # plain greedy, as generate_greedy decodes (the server's repetition guard would differ)
    ours = drafter.submit(prompt, max_new_tokens=NEW_TOKENS, adapter=adapter, guard=PLAIN_GREEDY).result()
    theirs = in_fresh_thread(
        lambda: generate_greedy(
            model, [prompt], max_new_tokens=NEW_TOKENS, stop_ids=stops, pad_id=pad_token_id(drafter.tokenizer)
        )[0]
    )
    return ours == theirs


def adapter_timings(drafter: Drafter, folder: Path, count: int = 8) -> dict:
    """Cold load of `count` adapters, then switches between them once cached: a single stream
    moving to another tenant's adapter, and an 8-tenant batch whose composition changed."""
    import shutil

    refs = []
    for i in range(count):
        shutil.copytree(folder, folder.parent / f"copy-{i}")
        refs.append(AdapterRef(100 + i, folder.parent / f"copy-{i}"))
    engine = drafter.backend
    model_shape = {"num_layers": engine.model.num_layers, "device": engine.device, "dtype": engine.model.dtype}
    cold = []
    for ref in refs:
        cache = AdapterCache(max_count=count, max_bytes=2**40, **model_shape)
        started = time.perf_counter()
        cache.get(ref)
        cold.append(time.perf_counter() - started)
    weights = [drafter.backend.adapters.get(ref) for ref in refs]
    single, mixed = [], []
    for i in range(200):
        started = time.perf_counter()
        engine.stacker.stack([weights[i % count]])
        single.append(time.perf_counter() - started)
        rows = [weights[(i + j) % count] for j in range(count)] + ([weights[0]] if i % 2 else [])
        started = time.perf_counter()
        engine.stacker.stack(rows)  # every other time a row joins: a new composition
        mixed.append(time.perf_counter() - started)
    return {
        "adapter_mb": round(weights[0].nbytes / 2**20, 1),
        "cold_load_ms": _percentiles(cold),
        "cached_switch_single_stream_ms": _percentiles(single),
        "cached_switch_8_tenant_batch_ms": _percentiles(mixed),
    }


def _percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50": round(statistics.median(ms), 3), "p95": round(ms[int(0.95 * (len(ms) - 1))], 3)}


LLAMA_PYTHON = Path(".venv-llama/bin/python")  # `make llama-cpp`
# Run by .venv-llama's Python: llama.cpp decoding the same GGUF greedily after the same prompt
# (ids), timed from the first new token to the last, median of RUNS after a warm-up.
LLAMA_SCRIPT = """
import json, statistics, sys, time
from llama_cpp import Llama
prompt, new_tokens, runs, batch = json.loads(sys.argv[2])
model = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, n_batch=batch, n_ubatch=batch, verbose=False)
rates, prefills = [], []
for _ in range(runs + 1):
    started, stamps = time.perf_counter(), []
    for token in model.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    rates.append((new_tokens - 1) / (stamps[-1] - stamps[0]))
    prefills.append(stamps[0] - started)
print(json.dumps({"decode_tokens_per_s": round(statistics.median(rates[1:]), 1),
                  "prefill_s": round(statistics.median(prefills[1:]), 3)}))
"""


def llama_cpp_anchor(prompt: list[int]) -> dict:
    """The embedded GGUF (its own Q4_1 weights) decoded by llama.cpp on the same cores."""
    import importlib.util
    import json
    import subprocess

    from agent.base_model import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE

    if not LLAMA_PYTHON.exists():
        return {"skipped": f"{LLAMA_PYTHON} is missing: run `make llama-cpp`"}
    gguf = Path(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
    note = {}
    for batch in (512, 1):
        job = json.dumps([prompt, NEW_TOKENS, RUNS, batch])
        done = subprocess.run([str(LLAMA_PYTHON), "-c", LLAMA_SCRIPT, str(gguf), job], capture_output=True, text=True)
        if done.returncode == 0:
            break
        # Seen on 2 AMX Xeon cores: a general protection fault in libggml-cpu while prefilling in
        # batches; one token at a time it decodes (its prefill figure is then a slower one's)
        note = {"note": f"batched prefill failed (exit status {done.returncode}): prefilled one token at a time"}
    if done.returncode != 0:  # e.g. a build whose instructions this CPU refuses (SIGILL): the engine's figures stand
        return {"failed": f"exit status {done.returncode}", "stderr": done.stderr[-2000:]}
    return (
        json.loads(done.stdout)
        | note
        | {
            "weights": "Q4_1 (the GGUF as shipped)",
            "gguf_mb": round(gguf.stat().st_size / 1e6, 1),
        }
    )


def format_bytes_per_token(engine) -> int:
    """Bytes of base weights one decode step reads in the engine's format (every projection of
    every layer and the LM head; the embedding is read one row at a time)."""
    model = engine.model
    weights = [w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return sum(w.nbytes for w in [*weights, model.lm_head])


def time_bfloat16(prompt: list[int], ref: AdapterRef, figures: dict, plain: dict) -> dict:
    """The `float` format of a bfloat16 model (what the server loads where the CPU computes in
    bfloat16 natively), against the same float32 `generate` and its own bytes' ceiling."""
    settings = Settings(model_dtype="bfloat16")
    drafter = Drafter.local(load_base_model(settings), settings)
    entry = ceiling_of(drafter, figures["bandwidth_gb_s"])
    entry["whole_step_rows"] = drafter.backend.model.step_rows
    for name, adapter in (("base", None), ("adapter", ref)):
        entry[name] = timed(drafter, prompt, adapter, plain[name], entry["ceiling_tokens_per_s"])
    drafter.close()
    return entry


def ceiling_of(drafter: Drafter, bandwidth_gb_s: float) -> dict:
    """The bytes of base weights a token reads in the drafter's format, and the ceiling they give."""
    read = format_bytes_per_token(drafter.backend)
    return {
        "weight_mb_read_per_token": round(read / 1e6, 1),
        "ceiling_tokens_per_s": round(bandwidth_gb_s * 1e9 / read, 1),
    }


def timed(drafter: Drafter, prompt: list[int], adapter, plain: dict, ceiling: float) -> dict:
    """The engine's decode rate against float32 `generate`'s (`plain`) and the format's ceiling."""
    engine = time_engine(drafter, prompt, adapter)
    rate = engine["decode_tokens_per_s"]
    return {
        "engine": engine,
        "speedup_vs_float32_generate": round(rate / plain["decode_tokens_per_s"], 2),
        "share_of_ceiling": round(rate / ceiling, 2),
    }


def main() -> None:
    sample = load_sample_tenant()
    email = sample.emails[1]
    figures: dict = {"bandwidth_gb_s": round(in_fresh_thread(bandwidth_gb_s), 1), "new_tokens": NEW_TOKENS}
    # float32: the dtype the targets are stated in (and that every CPU computes fast)
    settings = Settings(model_dtype="float32")
    # Torch work outside the engine runs in threads that end (see in_fresh_thread): as in a server.
    loaded = in_fresh_thread(load_base_model, settings)
    figures["dtype"] = str(loaded.model.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as scratch:
        ref = in_fresh_thread(random_adapter, loaded.model, Path(scratch) / "adapter")
        drafter = in_fresh_thread(Drafter.local, loaded, settings.model_copy(update={"serving_weights": "float"}))
        prompt = drafter.prompt(sample.instructions, IncomingEmail(email.sender, email.subject, email.body))
        stops = sorted(drafter.backend.stop_ids)  # the engine's own; timing turns them off
        figures["prompt_tokens"] = len(prompt)
        pad = pad_token_id(drafter.tokenizer)
        # Plain generate first, before the engine's thread exists: it runs alone, as it would
        # without the engine (base model, then through PEFT with the adapter).
        plain = {"base": in_fresh_thread(time_generate, loaded.model, prompt, pad)}
        model = in_fresh_thread(attach, loaded.model, ref)
        plain["adapter"] = in_fresh_thread(time_generate, model, prompt, pad)
        figures["generate"] = plain
        for weights in ("float", "int8", "int4"):
            if weights != "float":
                drafter = in_fresh_thread(
                    Drafter.local, loaded, settings.model_copy(update={"serving_weights": weights})
                )
            entry = ceiling_of(drafter, figures["bandwidth_gb_s"])
            if weights == "float":  # the decode products measured fastest on this CPU (agent/weights.py)
                entry["products"] = drafter.backend.model.products
            for name, adapter in (("base", None), ("adapter", ref)):
                entry[name] = timed(drafter, prompt, adapter, plain[name], entry["ceiling_tokens_per_s"])
                if weights == "float":  # the quantized formats' tokens are compared in bench.quantized
                    if adapter is None:
                        with model.disable_adapter():
                            entry[name]["same_tokens_as_generate"] = same_tokens(drafter, model, prompt, None, stops)
                    else:
                        entry[name]["same_tokens_as_generate"] = same_tokens(drafter, model, prompt, adapter, stops)
            if weights == "float":
                entry["adapters"] = in_fresh_thread(adapter_timings, drafter, Path(scratch) / "adapter")
            drafter.close()
            figures[weights] = entry
            print(weights, entry, flush=True)
        if resolve_dtype("auto") == torch.bfloat16:  # the server's default `float` here: bfloat16
            figures["float_bfloat16"] = in_fresh_thread(time_bfloat16, prompt, ref, figures, plain)
            print("float (bfloat16)", figures["float_bfloat16"], flush=True)
    figures["llama_cpp"] = llama_cpp_anchor(prompt)
    print("llama.cpp", figures["llama_cpp"], flush=True)
    best = max(("float", "int8", "int4"), key=lambda w: figures[w]["base"]["engine"]["decode_tokens_per_s"])
    figures["targets"] = {
        "best format": best,
        "speedup_vs_float32_generate >= 2.5": figures[best]["base"]["speedup_vs_float32_generate"],
        "share_of_its_format_ceiling >= 0.6": figures[best]["base"]["share_of_ceiling"],
        "cached_switch_p95_ms <= 20": figures["float"]["adapters"]["cached_switch_8_tenant_batch_ms"]["p95"],
    }
    save("decode", figures)


if __name__ == "__main__":
    main()
