"""One training run, start to finish: snapshot the datasets, train a candidate with QLoRA,
evaluate it against the champion on the same held-out snapshot, and let the gate decide.

Each phase commits on its own so progress is visible while the run goes on; the champion
changes only in the last transaction, so a crash at any point leaves it untouched. The run's
rows themselves (creating, looking up, exporting) are in training/runs.py."""

import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import PreTrainedTokenizerBase

from agent.adapters import attach
from agent.base_model import fingerprint, load_base_model, load_tokenizer, model_id, model_source
from agent.drafting import Drafter
from core.db import Sessions, session_scope
from core.errors import NotFound
from core.settings import Settings
from feedback.models import Split, Tenant
from training import attempts, compose, plots, registry
from training.config import TrainConfig
from training.dataset import Dataset, record_snapshot, tenant_dataset
from training.evaluate import (
    EvaluationReport,
    Versions,
    decide,
    example_nll,
    greedy_drafts,
    mean,
    score_drafts,
    summarize,
)
from training.models import Adapter, AdapterStatus, RunStatus, SnapshotKind, TrainingRun, utcnow
from training.regression_set import regression_rows
from training.runs import run_dir
from training.train import load_training_base, train_adapter

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunContext:
    """What every phase of one attempt at a run works with."""

    attempt: attempts.Attempt
    tenant_id: int
    config: TrainConfig
    settings: Settings
    echo: Echo
    composition: dict | None = None  # the run combines these adapters instead of training (training/compose.py)

    @property
    def run_id(self) -> int:
        return self.attempt.run_id


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


def evaluate_run(context: RunContext, candidate_id: int, rows: list[dict]) -> EvaluationReport:
    """Score the base model, the champion (if any: the adapter the tenant drafts with, for a team
    without one of its own its organization's) and the candidate on the held-out rows (NLL
    of each; greedy drafts of the first few), each adapter at the scale it would be served at,
    and the base model and the candidate on the regression set, and let the gate decide."""
    attempt, settings, echo, run_id = context.attempt, context.settings, context.echo, context.run_id
    loaded = load_base_model(settings)
    with attempt.sessions() as session:
        candidate = session.get(Adapter, candidate_id)
        current = registry.drafting_adapter(session, context.tenant_id)  # a team's may be its organization's
        refs = {"candidate": registry.serving_ref(session, settings, candidate, loaded.fingerprint)}
        if current is not None:
            refs["champion"] = registry.serving_ref(session, settings, current, loaded.fingerprint)
        versions = Versions(
            candidate=candidate.version,
            champion=current.version if current else None,
            champion_id=current.id if current else None,
            champion_inherited=current is not None and current.tenant_id != context.tenant_id,
        )
    sample = rows[: settings.eval_draft_examples]
    general = regression_rows(loaded.tokenizer, settings)
    names = ["base", *(["champion"] if "champion" in refs else []), "candidate"]
    started = time.perf_counter()
    # The engine reads the base weights now, before PEFT wraps the model for the NLL below.
    drafter = Drafter.local(loaded, settings.model_copy(update={"max_queue": max(settings.max_queue, len(sample))}))
    try:
        drafts = greedy_drafts(drafter, sample, {name: refs.get(name) for name in names}, settings.eval_max_new_tokens)
    finally:
        drafter.close()
    attempt.beat()
    echo(f"  drafted {len(sample)} held-out emails with each model ({time.perf_counter() - started:.0f}s)")
    model, scores, regression_s = loaded.model, {}, 0.0
    for name in names:  # the base goes first, before any adapter is attached
        started = time.perf_counter()
        if name != "base":
            model = attach(model, refs[name])
        scores[name] = {"nll": example_nll(model, loaded.tokenizer, rows), **score_drafts(drafts[name], sample)}
        attempt.beat()
        at = f" (scale {refs[name].scale:g})" if name != "base" else ""
        echo(
            f"  {name}{at}: held-out NLL {mean(scores[name]['nll']):.3f}, chrF {mean(scores[name]['chrf']):.1f}, "
            f"loops {sum(scores[name]['loops'])}/{len(sample)}, opening {mean(scores[name]['opening']):.0%}, "
            f"closing {mean(scores[name]['closing']):.0%} ({time.perf_counter() - started:.0f}s)"
        )
        if name != "champion":  # the forgetting guard compares the candidate with the bare base
            started = time.perf_counter()
            scores[name]["regression_nll"] = example_nll(model, loaded.tokenizer, general)
            regression_s += time.perf_counter() - started
            attempt.beat()
    champion_name = "champion" if "champion" in scores else "base"
    decision = decide(
        scores[champion_name]["nll"],
        scores["candidate"]["nll"],
        margin=settings.gate_margin,
        min_examples=settings.gate_min_heldout,
        base_regression_nll=scores["base"]["regression_nll"],
        candidate_regression_nll=scores["candidate"]["regression_nll"],
        forgetting_margin=settings.forgetting_margin,
        champion_loops=sum(scores[champion_name]["loops"]),
        candidate_loops=sum(scores["candidate"]["loops"]),
    )
    echo(f"  forgetting guard, {len(general)} general emails ({regression_s:.0f}s): {decision.forgetting.verdict}")
    folder = run_dir(settings, run_id)
    plots.champion_vs_candidate(
        scores[champion_name]["nll"],
        scores["candidate"]["nll"],
        folder / "heldout.png",
        f"run {run_id}: held-out NLL per example",
    )
    return EvaluationReport(
        run_id=run_id,
        versions=versions,
        scales={name: ref.scale for name, ref in refs.items()},
        heldout_examples=len(rows),
        drafted_examples=len(sample),
        regression_examples=len(general),
        summary={name: summarize(s) for name, s in scores.items()},
        per_example=scores,
        drafts=[
            {
                "reference": row["completion"][0]["content"],
                **{name: drafts[name][i].text for name in drafts},
                "finish_reasons": {name: drafts[name][i].finish_reason for name in drafts},
            }
            for i, row in enumerate(sample)
        ],
        decision=decision,
    )


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
