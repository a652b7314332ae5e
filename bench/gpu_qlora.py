"""Training on a GPU: draftloop's own training path (training/train.py: the NF4 base by
bitsandbytes, TRL's SFTTrainer, the learning rate and epoch chosen on validation, the scale
scored) on the sample tenant's first ROWS emails, for two base shapes with random weights (speed
and memory do not depend on the values): the embedded model's and Llama 2 7B's.

For each shape and NF4 path (`auto`, which dequantizes the NF4 weights once when they fit in
half of the free GPU memory, and `bitsandbytes`, the 4-bit weights applied on every step, the
path of a base too large to dequantize): seconds per step, trained tokens/s against the ceiling
the GPU's bf16 matrix product gives in the same process (FLOPs per token as bench.train_sample
counts them), and peak GPU memory.

Run, on a machine with a CUDA GPU: python -m bench.gpu_qlora   (a few minutes on an H200)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from agent.base_model import model_source
from agent.drafting import IncomingEmail
from bench.report import save
from core.settings import Settings
from feedback.samples import load_sample_tenant
from training.config import TrainConfig
from training.dataset import email_row
from training.train import load_training_base, train_adapter

ROWS = 80
# Llama 2 7B's shape, with the embedded model's tokenizer and vocabulary
SHAPE_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    tie_word_embeddings=False,
)


def gemm_tflops() -> float:
    """The GPU's bf16 matrix product, 8192 cubed: the best of three rounds of ten."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    a @ b
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * 8192**3 / best / 1e12


def random_base(config, folder: Path) -> int:
    """A base model of this shape with random weights, saved as a checkpoint; its body weights."""
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    body = sum(p.numel() for p in model.model.layers.parameters())
    del model
    torch.cuda.empty_cache()
    return body


def sample_rows(tokenizer, settings: Settings) -> list[dict]:
    sample = load_sample_tenant()
    return [
        email_row(sample.instructions, IncomingEmail(e.sender, e.subject, e.body), e.reply, tokenizer, settings)
        for e in sample.emails[:ROWS]
    ]


def run(source: Path, tokenizer, rows: list[dict], nf4_weights: str, body: int, head: int, tflops: float) -> dict:
    config = TrainConfig(nf4_weights=nf4_weights)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = load_training_base(str(source), config)
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(model, tokenizer, rows, config, Path(out))
    del model
    torch.cuda.empty_cache()
    reply_share = result.reply_tokens / result.trained_tokens
    ceiling = tflops * 1e12 / (4 * body + 4 * head * reply_share)
    tokens_per_s = result.trained_tokens / result.seconds
    return {
        "nf4_weights": nf4_weights,
        "load_s": round(load_s, 1),
        "steps": result.steps,
        "train_s": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / result.steps, 3),
        "trained_tokens": result.trained_tokens,
        "tokens_per_s": round(tokens_per_s),
        "ceiling_tokens_per_s": round(ceiling),
        "share_of_ceiling": round(tokens_per_s / ceiling, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "kept": result.selection["kept"],
    }


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench.gpu_qlora needs a CUDA GPU")
    settings = Settings()
    folder = model_source(settings)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rows = sample_rows(tokenizer, settings)
    tflops = gemm_tflops()
    figures: dict = {"rows": len(rows), "bf16_gemm_tflops": round(tflops, 1), "shapes": {}}
    embedded = AutoConfig.from_pretrained(folder, local_files_only=True)
    shapes = {"embedded": embedded, "llama-2-7b": AutoConfig.from_pretrained(folder, **SHAPE_7B)}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in shapes.items():
            source = Path(scratch) / name
            body = random_base(config, source)
            tokenizer.save_pretrained(source)
            head = config.vocab_size * config.hidden_size
            entry = {"body_parameters": body, "runs": []}
            for nf4_weights in ("auto", "bitsandbytes"):
                entry["runs"].append(run(source, tokenizer, rows, nf4_weights, body, head, tflops))
                print(name, json.dumps(entry["runs"][-1]), flush=True)
            figures["shapes"][name] = entry
    save("gpu-qlora", figures)


if __name__ == "__main__":
    main()
