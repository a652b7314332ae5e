"""Training on the sample tenant with the real embedded model, against the compute ceiling
measured in the same run.

The ceiling: a matrix product in the compute dtype (2048 x 2048, best of three rounds), timed in
each variant's process before and after it trains, over the FLOPs a trained token needs: about
4 per body weight (the forward pass, and the backward pass to the activations through the
frozen base) plus 4 per LM-head weight for the reply tokens (the only ones through the head).
Attention and the LoRA products are not counted: the ceiling is one no run can reach.

Variants, each in its own process (its peak RSS is its own):
- reference: the plain TRL + PEFT loop (SFTTrainer's own loss, NF4 through bitsandbytes,
  r=16 on q/k/v/o with dropout 0.05, lr 2e-4, batch 4), timed over a few steps;
- bitsandbytes: draftloop's recipe with the NF4 weights applied by bitsandbytes on every step
  (`nf4_weights=bitsandbytes`, the previous default), timed over a few steps;
- lora: plain LoRA on unquantized weights (`quantization=none`), timed over a few steps;
- qlora: the default, a full run: train, evaluate against the base model, gate;
- shuffled: the default on replies shuffled across emails, a deliberately bad candidate gated
  against the promoted one (a full run; not in the default list: `python -m bench.train_sample shuffled`);
- demo: `draftloop demo` as a new user runs it, its wall time and phases (`python -m bench.train_sample demo`).

Run: .venv/bin/python -m bench.train_sample [variant ...]   (default: reference bitsandbytes lora qlora)
"""

import dataclasses
import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

TIMED_STEPS = 4
# Spawned children import this module again: they find the folder in the environment.
WORK = Path(os.environ.setdefault("DRAFTLOOP_BENCH_DIR", tempfile.mkdtemp(prefix="draftloop-bench-")))
os.environ.update(
    DRAFTLOOP_VAR_DIR=str(WORK),
    DRAFTLOOP_DATABASE_URL=f"sqlite:///{WORK / 'bench.db'}",
    DRAFTLOOP_ADAPTER_DIR=str(WORK / "adapters"),
    DRAFTLOOP_MODEL_CACHE_DIR=str(Path("var/models").resolve()),
)


def load_history() -> int:
    """The sample tenant's emails and corrections, stored as the service stores them. The drafts'
    own text plays no part in training, so it is not generated here (`make demo` drafts for real)."""
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role
    from feedback.samples import load_sample_tenant, record_history
    from migrations import upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    sample = load_sample_tenant()
    with session_scope() as session:
        tenant = service.create_tenant(session, name=sample.name, slug=sample.slug, instructions=sample.instructions)
        reviewer, _ = service.create_api_key(session, tenant, name="sample reviewer", role=Role.reviewer)
        record_history(session, tenant.id, reviewer, sample.emails, settings.heldout_fraction)
        return tenant.id


def gemm_gflops(dtype) -> float:
    """The cores' matrix-product speed in the compute dtype: best of three rounds of ten."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * 2048**3 / best / 1e9


def model_flops_per_token(reply_share: float) -> float:
    """4 FLOPs per body weight per token, plus 4 per LM-head weight on the reply's share of tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from agent.base_model import model_source
    from core.settings import get_settings

    config = AutoConfig.from_pretrained(model_source(get_settings()), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body = sum(p.numel() for p in model.model.layers.parameters())
    head = model.get_output_embeddings().weight.numel()
    return 4 * body + 4 * head * reply_share


def measured(train) -> dict:
    """Run `train` (returning trained tokens, reply tokens, steps, seconds) between two timings of
    the ceiling, and report its throughput as a share of it."""
    from agent.base_model import resolve_dtype
    from core.settings import get_settings

    dtype = resolve_dtype(get_settings().model_dtype)
    before = gemm_gflops(dtype)
    figures = train()
    after = gemm_gflops(dtype)
    gflops = (before + after) / 2
    flops = model_flops_per_token(figures["reply_tokens"] / figures["trained_tokens"])
    ceiling = gflops * 1e9 / flops
    tokens_per_s = figures["trained_tokens"] / figures["seconds"]
    return figures | {
        "compute_dtype": str(dtype).removeprefix("torch."),
        "gemm_gflops_before_after": [round(before, 1), round(after, 1)],
        "ceiling_tokens_per_s": round(ceiling, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "share_of_ceiling": round(tokens_per_s / ceiling, 3),
        "seconds_per_step": round(figures["seconds"] / figures["steps"], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def train_rows(tenant_id: int) -> list[dict]:
    from agent.base_model import load_tokenizer
    from core.db import session_scope
    from core.settings import get_settings
    from feedback.models import Split, Tenant
    from training.dataset import tenant_dataset

    settings = get_settings()
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        return tenant_dataset(session, tenant, Split.train, load_tokenizer(settings), settings).rows


def reference(tenant_id: int) -> dict:
    """The plain loop: TRL's SFTTrainer as it comes, over a few steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from agent.base_model import load_tokenizer, model_source
    from core.settings import get_settings
    from training.config import TrainConfig
    from training.train import load_training_base

    settings = get_settings()
    tokenizer, rows = load_tokenizer(settings), train_rows(tenant_id)
    model = load_training_base(model_source(settings), TrainConfig(nf4_weights="bitsandbytes"))
    args = SFTConfig(
        output_dir=str(WORK / "reference"),
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        max_steps=TIMED_STEPS + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    counts = {"tokens": 0, "reply": 0, "started": None}

    class Count(TrainerCallback):  # the first step is a warm-up, not timed
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                counts.update(tokens=0, reply=0, started=time.perf_counter())

    original = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):
        counts["tokens"] += int(inputs["attention_mask"].sum())
        counts["reply"] += int((inputs["labels"] != -100).sum())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_loss
    trainer.add_callback(Count())

    def train():
        trainer.train()
        seconds = time.perf_counter() - counts["started"]
        return {
            "steps": TIMED_STEPS,
            "batch_size": 4,
            "trained_tokens": counts["tokens"],
            "reply_tokens": counts["reply"],
            "seconds": seconds,
        }

    return measured(train)


def timed_steps(tenant_id: int, overrides: dict) -> dict:
    """draftloop's training over a few steps of the sample's train rows (longest batch first)."""
    from agent.base_model import load_tokenizer, model_source
    from core.settings import get_settings
    from training.config import TrainConfig
    from training.train import load_training_base, train_adapter

    settings = get_settings()
    rows = train_rows(tenant_id)
    config = TrainConfig.with_overrides(overrides)
    config = dataclasses.replace(config, epochs=TIMED_STEPS * config.batch_size / len(rows))

    def train():
        model = load_training_base(model_source(settings), config)
        result = train_adapter(model, load_tokenizer(settings), rows, config, WORK / "timed")
        return {
            "steps": result.steps,
            "batch_size": config.batch_size,
            "trained_tokens": result.trained_tokens,
            "reply_tokens": result.reply_tokens,
            "seconds": result.seconds,
        }

    return measured(train) | {"overrides": overrides}


def pipeline_run(tenant_id: int, overrides: dict, shuffle: bool) -> dict:
    """A full draftloop run (train, evaluate against the champion, gate)."""
    from core.db import session_scope
    from core.settings import get_settings
    from training import dataset
    from training.models import TrainingRun
    from training.pipeline import execute_run
    from training.runs import create_run

    if shuffle:  # replies shuffled across emails: fluent house style, wrong answers
        build = dataset.build_dataset

        def shuffled(*args, **kwargs):
            built = build(*args, **kwargs)
            if kwargs["split"] == "train":
                replies = [row["completion"] for row in built.rows]
                random.Random(0).shuffle(replies)
                for row, reply in zip(built.rows, replies, strict=True):
                    row["completion"] = reply
            return built

        dataset.build_dataset = shuffled  # tenant_dataset builds with it
    with session_scope() as session:
        run_id = create_run(session, tenant_id, trigger="bench", requested_by="bench", overrides=overrides).id
    outcome = {}

    def train():
        started = time.perf_counter()
        outcome["status"] = execute_run(run_id, get_settings(), echo=lambda line: print(line, flush=True))
        outcome["run_seconds"] = round(time.perf_counter() - started)
        with session_scope() as session:
            run = session.get(TrainingRun, run_id)
            outcome["report"], outcome["reason"] = run.report, run.decision_reason
        training = outcome["report"]["training"]
        return {key: training[key] for key in ("steps", "trained_tokens", "reply_tokens", "seconds")}

    figures = measured(train)
    report = outcome["report"]
    return figures | {
        "status": outcome["status"],
        "reason": outcome["reason"],
        "run_seconds": outcome["run_seconds"],
        "heldout": report["summary"],
        "heldout_nll_change_vs_base": round(
            report["summary"]["candidate"]["nll"] / report["summary"]["base"]["nll"] - 1, 3
        ),
        "forgetting": report["decision"]["forgetting"],  # the regression set: base vs candidate
        "config": report["training"]["config"],
        "report": report["path"],
    }


def demo(tenant_id: int) -> dict:
    """The main job, end to end, in its own processes; the demo saves its phases' seconds."""
    import subprocess

    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DRAFTLOOP_")}  # the demo's own
    subprocess.run([sys.executable, "-m", "api.cli", "demo"], check=True, env=env)
    phases = json.loads(Path("var/demo/phases.json").read_text())
    return {"wall_s": round(time.perf_counter() - started, 1), "phases_s": phases}


def _in_child(name: str, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(globals()[name], args)


VARIANTS = {
    "reference": ("reference",),
    "bitsandbytes": ("timed_steps", {"nf4_weights": "bitsandbytes"}),
    "lora": ("timed_steps", {"quantization": "none"}),
    "qlora": ("pipeline_run", {}, False),
    "shuffled": ("pipeline_run", {}, True),
    "demo": ("demo",),
}


def main() -> None:
    from bench.report import save

    names = sys.argv[1:] or ["reference", "bitsandbytes", "lora", "qlora"]
    tenant_id = load_history()
    figures: dict = {"work_dir": str(WORK)}
    for name in names:
        function, *args = VARIANTS[name]
        figures[name] = _in_child(function, tenant_id, *args)
        shown = {k: v for k, v in figures[name].items() if k not in ("heldout", "config", "reason")}
        print(f"{name}: {json.dumps(shown)}", flush=True)
    if "qlora" in figures:
        for other in ("reference", "bitsandbytes"):
            if other in figures:
                ratio = figures["qlora"]["tokens_per_s"] / figures[other]["tokens_per_s"]
                figures[f"qlora_speedup_vs_{other}"] = round(ratio, 2)
    save("train_sample", figures)


if __name__ == "__main__":
    main()
