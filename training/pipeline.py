"""One training run, start to finish: snapshot the datasets, train a candidate with QLoRA,
evaluate it against the champion on the same held-out snapshot, and let the gate decide.

Each phase commits on its own so progress is visible while the run goes on; the champion
changes only in the last transaction, so a crash at any point leaves it untouched. The run's
rows themselves (creating, looking up, exporting) are in training/runs.py, the evaluation phase
in training/run_evaluation.py."""

import json
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import PreTrainedTokenizerBase

from agent.base_model import fingerprint, load_tokenizer, model_id, model_source
from core.db import Sessions, session_scope
from core.errors import NotFound
from core.settings import Settings
from feedback.models import Split, Tenant
from training import attempts, compose, plots, registry
from training.config import TrainConfig
from training.dataset import Dataset, record_snapshot, tenant_dataset
from training.evaluate import EvaluationReport
from training.models import Adapter, AdapterStatus, RunStatus, SnapshotKind, TrainingRun, utcnow
from training.run_context import Echo, RunContext
from training.run_evaluation import evaluate_run
from training.runs import run_dir
from training.train import load_training_base, train_adapter


def execute_run(run_id: int, settings: Settings, *, sessions: Sessions = session_scope, echo: Echo = print):
    """Carry a queued run to promoted, shadowed, rejected or failed in one attempt (training/attempts.py).
    A run that finished, or that another live attempt is carrying, is left as it is, so a second
    delivery of the task does nothing. Returns the run's status."""
    with sessions() as session:
        if session.get(TrainingRun, run_id) is None:
            raise NotFound(f"no training run {run_id}")
        number = attempts.claim(session, run_id, settings)
        run = session.get(TrainingRun, run_id, populate_existing=True)
        if number is None:
            echo(f"run {run_id} is {run.status}; not started again")
            return run.status
        _reject_candidates(session, run_id, f"run {run_id} attempt did not finish")  # from a dead attempt
        attempt = attempts.Attempt(run_id, number, sessions)
        config = TrainConfig.with_overrides(run.config)
        context = RunContext(attempt, run.tenant_id, config, settings, echo, run.composition)
    try:
        with attempt.heartbeat(every_s=settings.stale_after_s / 6):
            return _execute(context)
    except attempts.RunTaken as taken:
        echo(f"run {run_id}: this attempt stops: {taken}")
        return RunStatus(taken.status)
    except Exception as error:
        with sessions() as session:
            try:
                run = attempt.owned(session)
            except attempts.RunTaken:
                raise error from None
            run.status, run.finished_at = RunStatus.failed, utcnow()
            run.error = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"
            _reject_candidates(session, run_id, f"run {run_id} failed before the gate")
        echo(f"run {run_id} failed: {type(error).__name__}: {error}")
        raise


def _reject_candidates(session: Session, run_id: int, reason: str) -> None:
    """Candidates of this run that never reached the gate are rejected, never left dangling."""
    for adapter in session.scalars(select(Adapter).where(Adapter.training_run_id == run_id)):
        if adapter.status == AdapterStatus.candidate:
            registry.reject(session, adapter, actor="training", reason=reason)


def _execute(context: RunContext) -> RunStatus:
    tokenizer = load_tokenizer(context.settings)
    train, heldout, pairs, train_snapshot_id = _snapshot_datasets(context, tokenizer)
    if len(heldout.rows) < context.settings.gate_min_heldout:
        reason = (
            f"only {len(heldout.rows)} held-out examples; the gate needs at least {context.settings.gate_min_heldout}"
        )
        return _finish(context, RunStatus.rejected, reason)
    if context.composition is not None:
        candidate_id, training = _combine_candidate(context)
    else:
        candidate_id, training = _train_candidate(context, tokenizer, train, pairs, train_snapshot_id)
    report = replace(evaluate_run(context, candidate_id, heldout.rows), training=training)
    status = RunStatus.promoted if report.decision.promote else RunStatus.rejected
    return _finish(context, status, report.decision.reason, report, candidate_id)


def _snapshot_datasets(
    context: RunContext, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset, Dataset | None, int]:
    """The train and held-out datasets as of now, and the train split's preference pairs when the
    run trains with them, recorded as the run's snapshots."""
    config = context.config
    with context.attempt.sessions() as session:
        tenant = session.get(Tenant, context.tenant_id)
        train, heldout = (
            tenant_dataset(session, tenant, split, tokenizer, context.settings, config.max_length)
            for split in (Split.train, Split.heldout)
        )
        pairs = None
        if config.preference != "none":
            pairs = tenant_dataset(
                session, tenant, Split.train, tokenizer, context.settings, config.max_length, SnapshotKind.preference
            )
        run = context.attempt.owned(session)
        run.train_snapshot_id = record_snapshot(session, train).id
        run.heldout_snapshot_id = record_snapshot(session, heldout).id
        if pairs is not None:
            run.preference_snapshot_id = record_snapshot(session, pairs).id
        train_snapshot_id = run.train_snapshot_id
    with_pairs = f", {len(pairs.rows)} preference pairs (dropped {pairs.dropped or 'none'})" if pairs else ""
    context.echo(
        f"run {context.run_id}: {len(train.rows)} train rows (dropped {train.dropped or 'none'}), "
        f"{len(heldout.rows)} held-out rows{with_pairs}; snapshot {train.content_hash[:12]}"
    )
    return train, heldout, pairs, train_snapshot_id


def _train_candidate(
    context: RunContext,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    pairs: Dataset | None,
    train_snapshot_id: int,
) -> tuple[int, dict]:
    """Train on the train rows and store the adapter as the run's candidate; the run goes on to
    evaluating. Returns the candidate's id and what training did, for the report."""
    attempt, config, settings = context.attempt, context.config, context.settings
    run_id, echo = context.run_id, context.echo
    source = model_source(settings)
    started = time.perf_counter()

    def progress(step: int, total_steps: int, loss: float | None) -> None:
        with attempt.sessions() as session:
            run = attempt.owned(session)
            run.step, run.total_steps, run.heartbeat_at = step, total_steps, utcnow()
            if loss is not None:
                run.loss = loss
                run.loss_history = [*run.loss_history, {"step": step, "loss": round(loss, 4)}]
        if loss is not None:
            elapsed = time.perf_counter() - started
            echo(f"  step {step}/{total_steps}  loss {loss:.3f}  {elapsed:.0f}s")

    champion = None
    if config.preference != "none" and config.preference_reference == "champion":
        with attempt.sessions() as session:
            champion = registry.champion_ref(session, settings, context.tenant_id, fingerprint(source))
    with tempfile.TemporaryDirectory(prefix="draftloop-adapter-") as scratch:
        result = train_adapter(
            load_training_base(source, config),
            tokenizer,
            train.rows,
            config,
            Path(scratch),
            progress,
            pairs=pairs.rows if pairs else [],
            champion=champion,
        )
        candidate_id = _store_candidate(
            context,
            Path(scratch),
            config=config.as_dict(),
            train_snapshot_id=train_snapshot_id,
            scale=result.selection["scale"],
        )
    tokens_per_s = result.trained_tokens / result.seconds
    echo(
        f"run {run_id}: trained {result.steps} steps in {result.seconds:.0f}s "
        f"({tokens_per_s:.0f} tokens/s); evaluating on held-out"
    )
    if tried := result.selection["scales_tried"]:
        scores = ", ".join(f"{t['scale']:g}: {t['validation_nll']:.4f}" for t in tried)
        echo(
            f"  adapter scale {result.selection['scale']:g} chosen by validation NLL ({scores}; "
            f"{result.selection['scale_seconds']:.0f}s)"
        )
    if stage := result.selection.get("preference"):
        did = stage.get("skipped") or f"{stage['steps']} steps, {stage['pairs']} pairs, reference {stage['reference']}"
        echo(f"  preference training ({stage['stage']}): {did}")
    plots.loss_curve(result.loss_history, run_dir(settings, run_id) / "loss.png", f"run {run_id} training loss")
    return candidate_id, {
        "rows": len(train.rows),
        "dropped": train.dropped,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "trained_tokens": result.trained_tokens,
        "reply_tokens": result.reply_tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "selection": result.selection,
        "config": config.as_dict(),
    }


def _combine_candidate(context: RunContext) -> tuple[int, dict]:
    """Combine the run's parent adapters (training/compose.py) and store the result as the run's
    candidate, recorded with its parents and weights; the run goes on to evaluating."""
    source, composition, started = model_source(context.settings), context.composition, time.perf_counter()
    with context.attempt.sessions() as session:
        parents = compose.parent_refs(session, context.settings, composition, fingerprint(source))
    with tempfile.TemporaryDirectory(prefix="draftloop-combined-") as scratch:
        folder = compose.combine(source, parents, composition["method"], Path(scratch))
        rank = registry.rank_of(folder)
        candidate_id = _store_candidate(
            context,
            folder,
            config={"method": composition["method"], "rank": rank},
            train_snapshot_id=None,  # trained on no snapshot: its parents were
            composition=composition,
        )
    weights = compose.describe(composition)
    seconds = time.perf_counter() - started
    context.echo(f"run {context.run_id}: combined {weights} ({composition['method']}, rank {rank}, {seconds:.0f}s)")
    return candidate_id, {"composition": composition, "rank": rank, "seconds": round(seconds, 1)}


def _store_candidate(context: RunContext, folder: Path, **fields) -> int:
    """Store an adapter folder as the run's candidate (registry.store_candidate with `fields`);
    the run goes on to evaluating. Returns the candidate's id."""
    settings = context.settings
    with context.attempt.sessions() as session:
        run = context.attempt.owned(session)  # before the files are copied: one attempt stores at a time
        candidate = registry.store_candidate(
            session,
            settings,
            tenant_id=context.tenant_id,
            trained_dir=folder,
            base_model=model_id(settings),
            base_fingerprint=fingerprint(model_source(settings)),
            training_run_id=context.run_id,
            **fields,
        )
        run.status, run.heartbeat_at = RunStatus.evaluating, utcnow()
        return candidate.id


def _finish(
    context: RunContext,
    status: RunStatus,
    reason: str,
    report: EvaluationReport | None = None,
    candidate_id: int | None = None,
) -> RunStatus:
    """The one transaction that decides: the run's outcome and, if promoted, the new champion,
    written only while this attempt still owns the run; a candidate that passed the gate of a
    tenant with `shadow_corrections` set goes into shadow instead (the run is `shadowed`). A run
    rejected before training has no report and no candidate."""
    attempt, settings, run_id = context.attempt, context.settings, context.run_id
    stored = None
    if report is not None:
        path = run_dir(settings, run_id) / "report.json"
        data = report.as_json()
        path.write_text(json.dumps(data, indent=2))
        stored = {key: value for key, value in data.items() if key != "per_example"} | {"path": str(path)}
    with attempt.sessions() as session:
        run = attempt.owned(session)
        if candidate_id is not None:
            registry.lock_tenant(session, run.tenant_id)
            current = registry.drafting_adapter(session, run.tenant_id)
            candidate = session.get(Adapter, candidate_id)
            if status == RunStatus.promoted and (current.id if current else None) != report.versions.champion_id:
                status, reason = RunStatus.rejected, "the champion changed while this run was evaluated; not promoted"
            if status == RunStatus.promoted and (needed := session.get(Tenant, run.tenant_id).shadow_corrections):
                status, reason = RunStatus.shadowed, f"{reason}; in shadow beside the champion for {needed} corrections"
            candidate.metrics = report.summary["candidate"] | {"run_id": run_id}
        run.status, run.decision_reason, run.report, run.finished_at = status, reason, stored, utcnow()
        session.flush()  # the run is decided, so the registry no longer counts it as evaluating
        if candidate_id is not None:
            actor = f"gate (run {run_id})"
            if status == RunStatus.promoted:
                registry.promote(session, settings, candidate, actor=actor, reason=reason)
            elif status == RunStatus.shadowed:
                registry.start_shadow(session, settings, candidate, actor=actor, reason=reason)
            else:
                registry.reject(session, candidate, actor=actor, reason=reason)
    context.echo(f"run {run_id}: {status}: {reason}")
    return status
