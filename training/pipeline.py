"""One training run, start to finish: snapshot the datasets, train a candidate with QLoRA,
evaluate it against the champion on the same held-out snapshot, and let the gate decide.

Each phase commits on its own so progress is visible while the run goes on; the champion
changes only in the last transaction, so a crash at any point leaves it untouched."""

import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.adapters import attach
from agent.drafting import Drafter
from agent.model import fingerprint, load_base_model, load_tokenizer, model_id, model_source
from core.db import Sessions, session_scope
from core.errors import Conflict, NotFound
from core.settings import Settings
from feedback.models import Split, Tenant
from feedback.service import get_tenant_by_slug
from training import attempts, plots, registry
from training.dataset import build_dataset, record_snapshot
from training.evaluate import decide, example_nll, greedy_drafts, score_drafts
from training.models import (
    ACTIVE_RUN_STATUSES,
    Adapter,
    AdapterStatus,
    DatasetSnapshot,
    RunStatus,
    TrainingRun,
    utcnow,
)
from training.train import TrainConfig, load_training_base, train_adapter

Echo = Callable[[str], None]


def create_run(
    session: Session, tenant_id: int, *, trigger: str, requested_by: str, overrides: dict | None = None
) -> TrainingRun:
    """A queued run; the database refuses a second active run for the same tenant."""
    config = TrainConfig.with_overrides(overrides)
    run = TrainingRun(
        tenant_id=tenant_id,
        status=RunStatus.queued,
        trigger=trigger,
        requested_by=requested_by,
        config=config.as_dict(),
        loss_history=[],
    )
    try:
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        active = active_run(session, tenant_id)
        raise Conflict(
            f"run {active.id if active else '?'} is already {active.status if active else 'active'} "
            "for this tenant; wait for it to finish"
        ) from None
    return run


def active_run(session: Session, tenant_id: int) -> TrainingRun | None:
    return session.scalar(
        select(TrainingRun).where(TrainingRun.tenant_id == tenant_id, TrainingRun.status.in_(ACTIVE_RUN_STATUSES))
    )


def get_run(session: Session, tenant_id: int, run_id: int) -> TrainingRun:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.tenant_id == tenant_id))
    if run is None:
        raise NotFound(f"no training run {run_id}")
    return run


def list_runs(session: Session, tenant_id: int, *, limit: int) -> list[TrainingRun]:
    query = select(TrainingRun).where(TrainingRun.tenant_id == tenant_id).order_by(TrainingRun.id.desc())
    return list(session.scalars(query.limit(limit)))


def export_snapshot(session: Session, snapshot_id: int, settings: Settings) -> str:
    """A stored dataset snapshot as JSONL, rebuilt from its corrections and checked against its hash."""
    snapshot = session.get(DatasetSnapshot, snapshot_id)
    dataset = build_dataset(
        session,
        tenant_id=snapshot.tenant_id,
        instructions=snapshot.instructions,
        split=Split(snapshot.split),
        tokenizer=load_tokenizer(settings),
        settings=settings,
        max_length=snapshot.max_length,
        up_to_correction_id=snapshot.max_correction_id,
    )
    if dataset.content_hash != snapshot.content_hash:
        raise Conflict(f"snapshot {snapshot_id} can no longer be rebuilt exactly (its hash differs)")
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset.rows)


def run_dir(settings: Settings, run_id: int) -> Path:
    folder = settings.reports_dir / f"run-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def execute_run(run_id: int, settings: Settings, *, sessions: Sessions = session_scope, echo: Echo = print):
    """Carry a queued run to promoted, rejected or failed in one attempt (training/attempts.py).
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
        tenant = session.get(Tenant, run.tenant_id)
        tenant_id, instructions, config = tenant.id, tenant.instructions, TrainConfig.with_overrides(run.config)
    attempt = attempts.Attempt(run_id, number, sessions)
    try:
        with attempt.heartbeat(every_s=settings.stale_after_s / 6):
            return _execute(attempt, tenant_id, instructions, config, settings, echo)
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


def _execute(attempt: attempts.Attempt, tenant_id, instructions, config: TrainConfig, settings, echo: Echo):
    run_id, sessions = attempt.run_id, attempt.sessions
    tokenizer = load_tokenizer(settings)
    with sessions() as session:
        datasets = {
            split: build_dataset(
                session,
                tenant_id=tenant_id,
                instructions=instructions,
                split=split,
                tokenizer=tokenizer,
                settings=settings,
                max_length=config.max_length,
            )
            for split in (Split.train, Split.heldout)
        }
        train, heldout = datasets[Split.train], datasets[Split.heldout]
        run = attempt.owned(session)
        run.train_snapshot_id = record_snapshot(session, train).id
        run.heldout_snapshot_id = record_snapshot(session, heldout).id
        train_snapshot_id = run.train_snapshot_id
    echo(
        f"run {run_id}: {len(train.rows)} train rows (dropped {train.dropped or 'none'}), "
        f"{len(heldout.rows)} held-out rows; snapshot {train.content_hash[:12]}"
    )
    if len(heldout.rows) < settings.gate_min_heldout:
        reason = f"only {len(heldout.rows)} held-out examples; the gate needs at least {settings.gate_min_heldout}"
        return _finish(attempt, RunStatus.rejected, reason, None, settings, echo)

    # Train a candidate ---------------------------------------------------------------------
    source = model_source(settings)
    started = time.perf_counter()

    def progress(step: int, total_steps: int, loss: float | None) -> None:
        with sessions() as session:
            run = attempt.owned(session)
            run.step, run.total_steps, run.heartbeat_at = step, total_steps, utcnow()
            if loss is not None:
                run.loss = loss
                run.loss_history = [*run.loss_history, {"step": step, "loss": round(loss, 4)}]
        if loss is not None:
            elapsed = time.perf_counter() - started
            echo(f"  step {step}/{total_steps}  loss {loss:.3f}  {elapsed:.0f}s")

    with tempfile.TemporaryDirectory(prefix="draftloop-adapter-") as scratch:
        result = train_adapter(
            load_training_base(source, config), tokenizer, train.rows, config, Path(scratch), progress
        )
        with sessions() as session:
            run = attempt.owned(session)  # before the files are copied: one attempt stores at a time
            candidate = registry.store_candidate(
                session,
                settings,
                tenant_id=tenant_id,
                trained_dir=Path(scratch),
                base_model=model_id(settings),
                base_fingerprint=fingerprint(source),
                config=config.as_dict(),
                train_snapshot_id=train_snapshot_id,
                training_run_id=run_id,
            )
            run.status, run.heartbeat_at = RunStatus.evaluating, utcnow()
            candidate_id = candidate.id
    echo(
        f"run {run_id}: trained {result.steps} steps in {result.seconds:.0f}s "
        f"({result.trained_tokens / result.seconds:.0f} tokens/s); evaluating on held-out"
    )
    plots.loss_curve(result.loss_history, run_dir(settings, run_id) / "loss.png", f"run {run_id} training loss")

    # Evaluate candidate and champion on the same held-out snapshot, then decide -------------
    report = evaluate_run(attempt, tenant_id, candidate_id, heldout.rows, settings, echo)
    report["training"] = {
        "rows": len(train.rows),
        "dropped": train.dropped,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "trained_tokens": result.trained_tokens,
        "reply_tokens": result.reply_tokens,
        "tokens_per_s": round(result.trained_tokens / result.seconds, 1),
        "selection": result.selection,
        "config": config.as_dict(),
    }
    decision = report["decision"]
    status = RunStatus.promoted if decision["promote"] else RunStatus.rejected
    return _finish(attempt, status, decision["reason"], report, settings, echo, candidate_id=candidate_id)


def evaluate_run(attempt: attempts.Attempt, tenant_id, candidate_id, rows, settings: Settings, echo: Echo) -> dict:
    run_id = attempt.run_id
    loaded = load_base_model(settings)
    with attempt.sessions() as session:
        candidate = session.get(Adapter, candidate_id)
        current = registry.champion(session, tenant_id)
        refs = {"candidate": registry.serving_ref(settings, candidate, loaded.fingerprint)}
        if current is not None:
            refs["champion"] = registry.serving_ref(settings, current, loaded.fingerprint)
        versions = {
            "candidate": candidate.version,
            "champion": current.version if current else None,
            "champion_id": current.id if current else None,
        }
    sample = rows[: settings.eval_draft_examples]
    names = ["base", *(["champion"] if "champion" in refs else []), "candidate"]
    started = time.perf_counter()
    # The engine reads the base weights now, before PEFT wraps the model for the NLL below.
    drafter = Drafter(loaded, settings.model_copy(update={"max_queue": max(settings.max_queue, len(sample))}))
    try:
        drafts = greedy_drafts(drafter, sample, {name: refs.get(name) for name in names}, settings.eval_max_new_tokens)
    finally:
        drafter.close()
    attempt.beat()
    echo(f"  drafted {len(sample)} held-out emails with each model ({time.perf_counter() - started:.0f}s)")
    model, scores = loaded.model, {}
    for name in names:  # the base goes first, before any adapter is attached
        started = time.perf_counter()
        if name != "base":
            model = attach(model, refs[name])
        scores[name] = {"nll": example_nll(model, loaded.tokenizer, rows), **score_drafts(drafts[name], sample)}
        attempt.beat()
        echo(
            f"  {name}: held-out NLL {_mean(scores[name]['nll']):.3f}, chrF {_mean(scores[name]['chrf']):.1f}, "
            f"loops {sum(scores[name]['loops'])}/{len(sample)}, opening {_mean(scores[name]['opening']):.0%}, "
            f"closing {_mean(scores[name]['closing']):.0%} ({time.perf_counter() - started:.0f}s)"
        )
    champion_name = "champion" if "champion" in scores else "base"
    decision = decide(
        scores[champion_name]["nll"],
        scores["candidate"]["nll"],
        margin=settings.gate_margin,
        min_examples=settings.gate_min_heldout,
        champion_loops=sum(scores[champion_name]["loops"]),
        candidate_loops=sum(scores["candidate"]["loops"]),
    )
    folder = run_dir(settings, run_id)
    plots.champion_vs_candidate(
        scores[champion_name]["nll"],
        scores["candidate"]["nll"],
        folder / "heldout.png",
        f"run {run_id}: held-out NLL per example",
    )
    return {
        "run_id": run_id,
        "versions": versions,
        "heldout_examples": len(rows),
        "drafted_examples": len(sample),
        "summary": {name: _summary(s) for name, s in scores.items()},
        "per_example": scores,
        "drafts": [
            {
                "reference": row["completion"][0]["content"],
                **{name: drafts[name][i].text for name in drafts},
                "finish_reasons": {name: drafts[name][i].finish_reason for name in drafts},
            }
            for i, row in enumerate(sample)
        ],
        "decision": decision.as_dict(),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summary(scores: dict[str, list]) -> dict[str, float]:
    """A model's totals: mean NLL and chrF; the share of drafts that loop, open and close as the
    reviewers' texts do, and do both ("style")."""
    style = [o and c for o, c in zip(scores["opening"], scores["closing"], strict=True)]
    return {
        "nll": round(_mean(scores["nll"]), 4),
        "chrf": round(_mean(scores["chrf"]), 2),
        "loop_rate": round(_mean(scores["loops"]), 3),
        "opening": round(_mean(scores["opening"]), 3),
        "closing": round(_mean(scores["closing"]), 3),
        "style": round(_mean(style), 3),
    }


def _finish(attempt: attempts.Attempt, status, reason, report, settings, echo: Echo, candidate_id=None):
    """The one transaction that decides: the run's outcome and, if promoted, the new champion,
    written only while this attempt still owns the run."""
    run_id = attempt.run_id
    if report is not None:
        path = run_dir(settings, run_id) / "report.json"
        path.write_text(json.dumps(report, indent=2))
        report = {key: value for key, value in report.items() if key != "per_example"} | {"path": str(path)}
    with attempt.sessions() as session:
        run = attempt.owned(session)
        if candidate_id is not None:
            registry.lock_tenant(session, run.tenant_id)
            current = registry.champion(session, run.tenant_id)
            candidate = session.get(Adapter, candidate_id)
            if status == RunStatus.promoted and (current.id if current else None) != report["versions"]["champion_id"]:
                status, reason = RunStatus.rejected, "the champion changed while this run was evaluated; not promoted"
            candidate.metrics = report["summary"]["candidate"] | {"run_id": run_id}
        run.status, run.decision_reason, run.report, run.finished_at = status, reason, report, utcnow()
        session.flush()  # the run is decided, so the registry no longer counts it as evaluating
        if candidate_id is not None:
            actor = f"gate (run {run_id})"
            if status == RunStatus.promoted:
                registry.promote(session, settings, candidate, actor=actor, reason=reason)
            else:
                registry.reject(session, candidate, actor=actor, reason=reason)
    echo(f"run {run_id}: {status}: {reason}")
    return status


def evaluate_tenant(slug: str, settings: Settings, *, sessions: Sessions = session_scope, echo: Echo = print) -> dict:
    """Score the bare base model and the tenant's champion on the current held-out set, and plot
    the held-out NLL every adapter version had when its run evaluated it."""
    loaded = load_base_model(settings)
    with sessions() as session:
        tenant = get_tenant_by_slug(session, slug)
        heldout = build_dataset(
            session,
            tenant_id=tenant.id,
            instructions=tenant.instructions,
            split=Split.heldout,
            tokenizer=loaded.tokenizer,
            settings=settings,
            max_length=TrainConfig().max_length,
        )
        current = registry.champion(session, tenant.id)
        ref = registry.serving_ref(settings, current, loaded.fingerprint) if current else None
        versions = [
            {"label": f"v{a.version}", "nll": a.metrics["nll"], "status": a.status}
            for a in registry.list_adapters(session, tenant.id)
            if "nll" in a.metrics
        ]
    if not heldout.rows:
        raise Conflict("this tenant has no held-out corrections yet")
    scores = {"base": _mean(example_nll(loaded.model, loaded.tokenizer, heldout.rows))}
    if ref is not None:
        scores[f"champion v{current.version}"] = _mean(
            example_nll(attach(loaded.model, ref), loaded.tokenizer, heldout.rows)
        )
    for name, nll in scores.items():
        echo(f"{name}: held-out NLL {nll:.3f} on {len(heldout.rows)} examples (snapshot {heldout.content_hash[:12]})")
    path = settings.reports_dir / f"{slug}-versions.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    points = [{"label": "base", "nll": scores["base"], "status": "retired"}, *versions]
    plots.versions_over_time(points, path, f"{slug}: held-out NLL per adapter version")
    echo(f"plot of every version: {path}")
    return scores
