"""Where each format of the engine's base weights is fast: one decode step of ROWS rows (each at
position 240, attending over a 241-token cache) and one prompt's prefill of PROMPT_TOKENS tokens,
for the float and int4 weights of the embedded model in float32, no adapters. Median of RUNS
calls, the formats alternating (bench.prefill.median_ms).

The question it answered: whether one format can serve every load, or prefills should read other
weights than decode steps (they now do: agent/weights._QuantizedWeight.prefill). To time the int4
kernel's own prefill, the benchmark prefills with the kernel for its run.

Run: .venv/bin/python -m bench.formats_by_rows   (about a minute on 2 CPU cores)
"""

import torch

from agent import weights as weight_formats
from agent.base_model import load_base_model
from agent.kv_cache import KVCache
from agent.llama import Llama
from bench.prefill import median_ms
from bench.report import save
from core.settings import Settings

FORMATS = ("float", "int4")
ROWS = (1, 2, 4, 8, 16)
PROMPT_TOKENS = (40, 240, 480)
POSITION = 240
RUNS = 9


def main() -> None:
    weight_formats._QuantizedWeight.prefill = weight_formats._QuantizedWeight.matmul  # the kernel's own prefill
    model = load_base_model(Settings(model_dtype="float32")).model
    engines = {weights: Llama(model, 512, weights) for weights in FORMATS}
    caches = {weights: KVCache(llama, max(ROWS), 512) for weights, llama in engines.items()}
    figures: dict = {"dtype": "float32", "decode_step_ms": {}, "prefill_ms": {}}
    with torch.inference_mode():
        for rows in ROWS:
            tokens, positions = torch.randint(0, 1000, (rows,)), torch.full((rows,), POSITION)

            def step(weights, tokens=tokens, positions=positions):
                attend = caches[weights].decode_attention(positions, span=POSITION + 1)
                return lambda: engines[weights].decode(tokens, None, attend)

            figures["decode_step_ms"][rows] = median_ms({w: step(w) for w in FORMATS}, RUNS)
            print("decode step, rows", rows, figures["decode_step_ms"][rows], flush=True)
        for length in PROMPT_TOKENS:
            prompt = [torch.randint(0, 1000, (length,))]

            def prefill(weights, prompt=prompt, length=length):
                attend = caches[weights].prefill_attention([0], [length])
                return lambda: engines[weights].prefill(prompt, None, attend)

            figures["prefill_ms"][length] = median_ms({w: prefill(w) for w in FORMATS}, RUNS)
            print("prefill, tokens", length, figures["prefill_ms"][length], flush=True)
    save("formats-by-rows", figures)


if __name__ == "__main__":
    main()
