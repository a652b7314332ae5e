"""Does the loop learn a tenant's house style and a real person's replies? Each tenant is trained
with the defaults through the real pipeline (train, evaluate, gate), in its own process.

Tenants:
- northwind-neutral: the sample shop's emails and replies, with instructions that say only who
  the shop is, not how it writes (the replies' style must come from training): 130 emails, about
  100 corrections in the train split. Its own house-style checks beside the generic ones: the
  greeting by first name, the ticket line quoting the subject's ticket, the three-line sign-off.
- enron-<mailbox>: the real replies of one person from ../shared/data/enron-replies, all of
  the mailbox's pairs, split by the service's own hash (a fifth held out).

Every held-out email is drafted by the base model and the candidate through the serving engine
with the server's repetition guard. Figures per tenant: held-out NLL and chrF before and after,
the share of drafts that loop, the generic style fidelity (opening, closing), the run's seconds.
Then the promoted adapter drafts the held-out emails again under each repetition guard of GUARDS
(the measurement behind the server's default), and with the engine's base weights in each format
of WEIGHTS (what 8 or 4 bits do to a trained adapter's drafts: the default format's measurement).

Run: .venv/bin/python -m bench.fidelity [tenant ...]
     (default: northwind-neutral enron-dasovich-j enron-nemec-g enron-steffes-j)
"""

import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ENRON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "enron-replies" / "pairs.jsonl"
NORTHWIND_EMAILS = 130
NEUTRAL_INSTRUCTIONS = (
    "You answer customer email for Northwind Cycles, a bicycle shop with an online store and a repair workshop."
)
SIGN_OFF = ["Ride safe,", "Marta", "Northwind Cycles Workshop"]
DEFAULT_TENANTS = ["northwind-neutral", "enron-dasovich-j", "enron-nemec-g", "enron-steffes-j"]
GUARDS = {  # settings overrides; every guard here stops cycles (the evaluation always does)
    "cycle stop only": {"repetition_penalty": 1.0},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2},
    "repetition_penalty 1.1, no_repeat_ngram_size 10": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 10},
}
# the serving engine's base-weight formats (agent/weights.py), each under the server's own guard
WEIGHTS = {f"weights {name}": {"serving_weights": name} for name in ("float", "int8", "int4")}


def _emails(tenant: str) -> tuple[str, list[dict]]:
    """The tenant's instructions and its (sender, subject, body, reply) history."""
    if tenant == "northwind-neutral":
        from feedback.samples import load_sample_tenant

        emails = load_sample_tenant().emails[:NORTHWIND_EMAILS]
        history = [{"sender": e.sender, "subject": e.subject, "body": e.body, "reply": e.reply} for e in emails]
        return NEUTRAL_INSTRUCTIONS, history
    person = tenant.removeprefix("enron-")
    pairs = [json.loads(line) for line in ENRON.read_text().splitlines() if line.strip()]
    pairs = [p for p in pairs if p["person"] == person]
    if not pairs:
        raise SystemExit(f"no pairs for mailbox {person!r} in {ENRON}")
    history = [
        {"sender": p["incoming_from"], "subject": p["subject"], "body": p["incoming"], "reply": p["reply"]}
        for p in pairs
    ]
    return f"You write the email replies of {person}, who works at Enron.", history


def northwind_checks(drafts: list[dict], name: str) -> dict:
    """The shop's house style in each held-out draft, read off the reviewer's own reply."""
    results = {"greeting": [], "ticket_line": [], "sign_off": []}
    for row in drafts:
        reference = [line.strip() for line in row["reference"].splitlines() if line.strip()]
        ours = [line.strip() for line in row[name].splitlines() if line.strip()]
        ticket = re.search(r"NW-\d+", reference[1]).group(0)
        results["greeting"].append(bool(ours) and ours[0] == reference[0])
        results["ticket_line"].append(len(ours) > 1 and ticket in ours[1])
        results["sign_off"].append(ours[-3:] == SIGN_OFF)
    results["all_three"] = [all(checks) for checks in zip(*results.values(), strict=True)]
    return {key: round(sum(v) / len(v), 3) for key, v in results.items()}


def run_tenant(tenant: str) -> dict:
    """Store the tenant's history, run the pipeline with the defaults, and read its report."""
    work = Path(tempfile.mkdtemp(prefix=f"draftloop-fidelity-{tenant}-"))
    os.environ.update(
        DRAFTLOOP_VAR_DIR=str(work),
        DRAFTLOOP_DATABASE_URL=f"sqlite:///{work / 'bench.db'}",
        DRAFTLOOP_MODEL_CACHE_DIR=str(Path("var/models").resolve()),
        DRAFTLOOP_EVAL_DRAFT_EXAMPLES="100",  # every held-out email
    )
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role
    from feedback.samples import SampleEmail, record_history
    from migrations import upgrade
    from training.pipeline import execute_run
    from training.runs import create_run

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    instructions, history = _emails(tenant)
    with session_scope() as session:
        row = service.create_tenant(session, name=tenant, slug=tenant, instructions=instructions)
        reviewer, _ = service.create_api_key(session, row, name="bench reviewer", role=Role.reviewer)
        emails = [SampleEmail(id=str(i), **email) for i, email in enumerate(history)]
        record_history(session, row.id, reviewer, emails, settings.heldout_fraction)
        run_id = create_run(session, row.id, trigger="bench", requested_by="bench").id
    started = time.perf_counter()
    status = execute_run(run_id, settings, echo=lambda line: print(f"[{tenant}] {line}", flush=True))
    figures = run_figures(tenant, run_id, status, time.perf_counter() - started)
    figures["guards"] = redraft(tenant, run_id, settings, GUARDS)
    figures["weights"] = redraft(tenant, run_id, settings, WEIGHTS)
    return figures


def run_figures(tenant: str, run_id: int, status: str, seconds: float) -> dict:
    """A finished run's figures, read from its report: the decision, training, and the base
    model's and the candidate's held-out scores (with the shop's own checks on Northwind)."""
    from core.db import session_scope
    from training.models import TrainingRun

    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        summary, reason, path = run.report["summary"], run.decision_reason, run.report["path"]
    report = json.loads(Path(path).read_text())
    training = report["training"]
    figures = {
        "status": status,
        "reason": reason,
        "train_rows": training["rows"],
        "heldout_rows": report["heldout_examples"],
        "drafted": report["drafted_examples"],
        "run_seconds": round(seconds, 1),
        "training_seconds": training["seconds"],
        "trained_tokens": training["trained_tokens"],
        "tokens_per_s": training["tokens_per_s"],
        "selection": training.get("selection"),
        "base": summary["base"],
        "candidate": summary["candidate"],
        "nll_change_vs_base": round(summary["candidate"]["nll"] / summary["base"]["nll"] - 1, 3),
        "config": training["config"],
        "report": path,
    }
    if tenant == "northwind-neutral":
        figures["house_style"] = {name: northwind_checks(report["drafts"], name) for name in ("base", "candidate")}
    return figures


def redraft(tenant: str, run_id: int, settings, variants: dict[str, dict]) -> dict:
    """The run's candidate drafting the run's own held-out snapshot again under each variant of
    the settings (a name and its overrides): loops, style, chrF, length stops."""
    from sqlalchemy import select

    from agent.base_model import load_base_model
    from agent.drafting import Drafter
    from core.db import session_scope
    from training import registry
    from training.evaluate import greedy_drafts, score_drafts
    from training.models import Adapter, TrainingRun
    from training.runs import export_snapshot

    loaded = load_base_model(settings)
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        rows = [json.loads(line) for line in export_snapshot(session, run.heldout_snapshot_id, settings).splitlines()]
        adapter = session.scalar(select(Adapter).where(Adapter.training_run_id == run_id))
        ref = registry.serving_ref(session, settings, adapter, loaded.fingerprint)
    results = {}
    for name, overrides in variants.items():
        drafter = Drafter.local(loaded, settings.model_copy(update=overrides | {"max_queue": len(rows) + 1}))
        started = time.perf_counter()
        try:
            drafts = greedy_drafts(drafter, rows, {"candidate": ref}, settings.eval_max_new_tokens)["candidate"]
        finally:
            drafter.close()
        scores = score_drafts(drafts, rows)
        report_rows = [
            {"reference": r["completion"][0]["content"], "candidate": d.text} for r, d in zip(rows, drafts, strict=True)
        ]
        results[name] = {
            "loop_rate": round(sum(scores["loops"]) / len(rows), 3),
            "length_stops": sum(d.finish_reason == "length" for d in drafts),
            "chrf": round(sum(scores["chrf"]) / len(rows), 2),
            "style": round(
                sum(o and c for o, c in zip(scores["opening"], scores["closing"], strict=True)) / len(rows), 3
            ),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if tenant == "northwind-neutral":
            results[name]["house_style"] = northwind_checks(report_rows, "candidate")
        print(f"[{tenant}] {name}: {json.dumps(results[name])}", flush=True)
    return results


def main() -> None:
    from bench.report import save

    tenants = sys.argv[1:] or DEFAULT_TENANTS
    figures: dict = {}
    for tenant in tenants:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            figures[tenant] = pool.apply(run_tenant, (tenant,))
        shown = {k: figures[tenant][k] for k in ("status", "run_seconds", "nll_change_vs_base", "candidate")}
        print(f"{tenant}: {json.dumps(shown)}", flush=True)
    enron = [f for name, f in figures.items() if name.startswith("enron-")]
    if enron:
        figures["enron_mean_nll_change_vs_base"] = round(sum(f["nll_change_vs_base"] for f in enron) / len(enron), 3)
    save("fidelity" if tenants == DEFAULT_TENANTS else "fidelity-" + "-".join(tenants), figures)


if __name__ == "__main__":
    main()
