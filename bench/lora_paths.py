"""The LoRA part of one decode step of the embedded model, apart from the rest: for a batch of
ROWS rows, the base projections of every layer (the fused weights as the engine holds them), then
the LoRA updates of the same inputs with one adapter for every row (`LoraWeights`) and with the
rows spread over TENANTS adapters (`GroupedLora`, rows interleaved as requests arrive), rank 16
on every projection; each as the engine computes it (the CPU kernel, agent/lora_kernel.py, for
rows of several adapters, and for one adapter's up to adapters.KERNEL_ROWS) and through PyTorch's
products alone (the path the kernel replaced, still used off the CPU). The figure that decides the mixed-tenant
throughput is the grouped update's cost as a share of the base projections'; each is the best of
RUNS steps. Then a prefill's: one adapter's update of PREFILL_ROWS rows (a prompt) against the
base products of a prefill, by the engine (lora_kernel.add_rows where the CPU has bfloat16
products) and by PyTorch's products. The weights and dtypes are the server's settings'
(DRAFTLOOP_SERVING_WEIGHTS=int8: float32 rows, bfloat16 kernel copies of the adapters).

Run: .venv/bin/python -m bench.lora_paths   (about a minute on 2 CPU cores)
"""

import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from agent import lora_kernel
from agent.adapters import INPUT_GROUPS, BatchStacker, LoraWeights
from agent.base_model import load_base_model
from agent.llama import Llama
from agent.weights import adapter_kernel_dtype
from bench.decode import random_adapter
from bench.report import save
from core.settings import Settings

ROWS = (1, 4, 16)
PREFILL_ROWS = 240
TENANTS = 8
RUNS = 20


def best_ms(step) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def main() -> None:
    settings = Settings()
    model = load_base_model(settings).model
    llama = Llama(model, max_length=64, weights=settings.serving_weights)
    kernel_dtype = adapter_kernel_dtype(model.dtype, settings.serving_weights)
    folder = Path(tempfile.mkdtemp(prefix="draftloop-lora-paths-"))
    adapters = []
    for seed in range(TENANTS):
        ref = random_adapter(model, folder / str(seed), seed=seed)
        ref = type(ref)(seed + 1, ref.path)  # each its own id
        adapters.append(LoraWeights.load(ref, llama.num_layers, llama.device, llama.dtype, kernel_dtype))
    fused = {"attn_in": "qkv", "attn_out": "o", "mlp_in": "gate_up", "mlp_out": "down"}
    inputs = {"attn_in": model.config.hidden_size, "attn_out": llama.q_size}
    inputs |= {"mlp_in": model.config.hidden_size, "mlp_out": llama.intermediate}
    figures = {"weights": settings.serving_weights, "rows_dtype": str(llama.dtype), "tenants": TENANTS, "rank": 16}
    figures |= {"adapters_kernel_dtype": str(kernel_dtype), "rows": {}}
    with torch.inference_mode():
        for rows in ROWS:
            x = {group: torch.randn(rows, inputs[group], dtype=llama.dtype) for group in INPUT_GROUPS}
            outs = {group: getattr(llama.layers[0], fused[group]).matmul(x[group]) for group in INPUT_GROUPS}

            def base(x=x):
                for weights in llama.layers:
                    for group in INPUT_GROUPS:
                        getattr(weights, fused[group]).matmul(x[group])

            def lora_of(batch_lora, x=x, outs=outs):
                def step():
                    for layer in range(llama.num_layers):
                        for group in INPUT_GROUPS:
                            batch_lora.add_to(outs[group], x[group], layer, group, llama.slices[group])

                return step

            one = adapters[0]
            spread = [adapters[row % TENANTS] for row in range(rows)]  # one row per sequence
            grouped = BatchStacker(llama.device).stack(spread)
            base_ms = best_ms(base)
            entry = {"base_projections_ms": base_ms}
            for path in ("engine", "pytorch"):  # the engine's choice (the kernel up to KERNEL_ROWS), or PyTorch's
                with mock.patch.object(lora_kernel, "usable", return_value=path == "engine"):
                    one_ms, grouped_ms = best_ms(lora_of(one)), best_ms(lora_of(grouped))
                entry[path] = {
                    "one_adapter_ms": one_ms,
                    "grouped_ms": grouped_ms,
                    "one_adapter_share_of_base": round(one_ms / base_ms, 3),
                    "grouped_share_of_base": round(grouped_ms / base_ms, 3),
                }
            figures["rows"][rows] = entry
            print(rows, entry, flush=True)
        figures["prefill"] = prefill(llama, adapters[0], inputs, fused)
        print("prefill", figures["prefill"], flush=True)
    save("lora-paths", figures)


def prefill(llama: Llama, adapter: LoraWeights, inputs: dict, fused: dict) -> dict:
    """One adapter's update of a prompt's PREFILL_ROWS rows in every layer, by the engine and by
    PyTorch's products, against the base products of the same prefill."""
    x = {group: torch.randn(PREFILL_ROWS, inputs[group], dtype=llama.dtype) for group in INPUT_GROUPS}
    outs = {group: getattr(llama.layers[0], fused[group]).prefill(x[group]) for group in INPUT_GROUPS}

    def base():
        for weights in llama.layers:
            for group in INPUT_GROUPS:
                getattr(weights, fused[group]).prefill(x[group])

    def update():
        for layer in range(llama.num_layers):
            for group in INPUT_GROUPS:
                adapter.add_to(outs[group], x[group], layer, group, llama.slices[group])

    entry = {"rows": PREFILL_ROWS, "base_products_ms": best_ms(base)}
    for path in ("engine", "pytorch"):
        with mock.patch.object(lora_kernel, "usable", return_value=path == "engine"):
            entry[f"{path}_ms"] = best_ms(update)
    entry["engine_share_of_base"] = round(entry["engine_ms"] / entry["base_products_ms"], 3)
    return entry


if __name__ == "__main__":
    main()
