"""Training on the sample tenant with the real embedded model, side by side:

- reference: the plain TRL + PEFT loop (SFTTrainer's own loss, NF4 with float32 compute,
  gradient checkpointing on, r=16 q/k/v/o, lr 2e-4, batch 4), timed over a few steps;
- qlora: draftloop's default (NF4 base, bf16 compute, completion-only LM head), full run,
  evaluated and gated against the bare base model;
- lora: the same with plain bf16 weights (no quantization), full run, evaluated;
- shuffled: the default trained on replies shuffled across emails: a deliberately bad
  candidate, gated against the promoted one.

Each variant runs in its own process, so its peak memory is its own.
Run: .venv/bin/python -m bench.train_sample   (about 20-25 minutes on 2 CPU cores)
"""

import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_STEPS = 6
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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference(tenant_id: int) -> dict:
    """The plain loop: TRL's SFTTrainer as it comes, over a few steps, for tokens/s."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from agent.model import load_tokenizer, model_source
    from core.db import session_scope
    from core.settings import get_settings
    from feedback.models import Split, Tenant
    from training.dataset import build_dataset
    from training.train import TrainConfig, load_training_base

    settings = get_settings()
    tokenizer = load_tokenizer(settings)
    with session_scope() as session:
        tenant = session.get(Tenant, tenant_id)
        rows = build_dataset(
            session,
            tenant_id=tenant_id,
            instructions=tenant.instructions,
            split=Split.train,
            tokenizer=tokenizer,
            settings=settings,
            max_length=768,
        ).rows
    model = load_training_base(model_source(settings), TrainConfig(compute_dtype="float32"))
    args = SFTConfig(
        output_dir=str(WORK / "reference"),
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        max_steps=REFERENCE_STEPS,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens_seen = tokens / len(rows) * 4 * REFERENCE_STEPS
    return {
        "steps_timed": REFERENCE_STEPS,
        "batch_size": 4,
        "seconds_per_step": round(seconds / REFERENCE_STEPS, 2),
        "tokens_per_s": round(tokens_seen / seconds, 1),
        "full_run_estimate_s": round(tokens * 3 / (tokens_seen / seconds)),
        "peak_rss_mib": round(_peak_rss_mib()),
    }


def pipeline_run(tenant_id: int, overrides: dict, shuffle: bool) -> dict:
    """A full draftloop run (train, evaluate against the champion, gate)."""
    from core.db import session_scope
    from core.settings import get_settings
    from training import dataset
    from training.models import TrainingRun
    from training.pipeline import create_run, execute_run

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

        import training.pipeline

        training.pipeline.build_dataset = shuffled
    with session_scope() as session:
        run_id = create_run(session, tenant_id, trigger="bench", requested_by="bench", overrides=overrides).id
    started = time.perf_counter()
    status = execute_run(run_id, get_settings(), echo=lambda line: print(line, flush=True))
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        report, reason = run.report, run.decision_reason
    return {
        "status": status,
        "reason": reason,
        "run_seconds": round(time.perf_counter() - started),
        "training": report["training"] if report else None,
        "heldout": report["summary"] if report else None,
        "seconds_per_step": round(report["training"]["seconds"] / report["training"]["steps"], 2) if report else None,
        "peak_rss_mib": round(_peak_rss_mib()),
        "report": report.get("path") if report else None,
    }


def _in_child(name: str, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(globals()[name], args)


def main() -> None:
    from bench.report import save

    variants = sys.argv[1:] or ["reference", "qlora", "lora", "shuffled"]
    tenant_id = load_history()
    figures: dict = {"work_dir": str(WORK)}
    if "reference" in variants:
        figures["reference"] = _in_child("reference", tenant_id)
        print("reference:", figures["reference"], flush=True)
    if "qlora" in variants:
        figures["qlora"] = _in_child("pipeline_run", tenant_id, {}, False)
    if "lora" in variants:
        figures["lora"] = _in_child("pipeline_run", tenant_id, {"quantization": "none"}, False)
    if "shuffled" in variants:
        figures["shuffled"] = _in_child("pipeline_run", tenant_id, {}, True)
    if "qlora" in figures and "reference" in figures:
        ours, ref = figures["qlora"]["training"], figures["reference"]
        figures["speedup_tokens_per_s_vs_reference"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 2)
        heldout = figures["qlora"]["heldout"]
        figures["heldout_nll_change_vs_base"] = round(heldout["candidate"]["nll"] / heldout["base"]["nll"] - 1, 3)
    save("train_sample", figures)
    print(json.dumps({k: v for k, v in figures.items() if k != "work_dir"}, indent=2)[:4000])


if __name__ == "__main__":
    main()
