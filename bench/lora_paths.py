"""The LoRA part of one decode step of the embedded model, apart from the rest: for a batch of
ROWS rows, the base projections of every layer (the fused weights as the engine holds them), then
the LoRA updates of the same inputs with one adapter for every row (`LoraWeights`) and with the
rows spread over TENANTS adapters (`GroupedLora`, rows interleaved as requests arrive), rank 16
on every projection; each as the engine computes it (the CPU kernel, agent/lora_kernel.py, for
rows of several adapters, and for one adapter's up to adapters.KERNEL_ROWS) and through PyTorch's
products alone (the path the kernel replaced, still used off the CPU). The figure that decides the mixed-tenant
throughput is the grouped update's cost as a share of the base projections'; each is the best of
RUNS steps.

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
from bench.decode import random_adapter
from bench.report import save
from core.settings import Settings

ROWS = (1, 4, 16)
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
    model = load_base_model(Settings()).model
    llama = Llama(model, max_length=64)
    folder = Path(tempfile.mkdtemp(prefix="draftloop-lora-paths-"))
    adapters = []
    for seed in range(TENANTS):
        ref = random_adapter(model, folder / str(seed), seed=seed)
        ref = type(ref)(seed + 1, ref.path)  # each its own id
        adapters.append(LoraWeights.load(ref, llama.num_layers, llama.device, llama.dtype))
    fused = {"attn_in": "qkv", "attn_out": "o", "mlp_in": "gate_up", "mlp_out": "down"}
    inputs = {"attn_in": model.config.hidden_size, "attn_out": llama.q_size}
    inputs |= {"mlp_in": model.config.hidden_size, "mlp_out": llama.intermediate}
    figures = {"tenants": TENANTS, "rank": 16, "rows": {}}
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
    save("lora-paths", figures)


if __name__ == "__main__":
    main()
