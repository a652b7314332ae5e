"""The evaluation phase of a training run: the base model, the champion and the candidate scored
on the run's held-out snapshot and on the regression set (the forgetting guard), and the gate's
decision (training/evaluate.py), as the run's report. training/pipeline.py runs the phases."""

import time

from agent.adapters import attach
from agent.base_model import load_base_model
from agent.drafting import Drafter
from training import plots, registry
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
from training.models import Adapter
from training.regression_set import regression_rows
from training.run_context import RunContext
from training.runs import run_dir


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
