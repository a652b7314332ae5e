"""SFT alone against SFT then DPO, on the style-fidelity benchmark's tenants (bench/fidelity.py).

Preference pairs need the drafts reviewers replaced, so the tenant's history is first drafted for
real: every email is drafted by the base model through the serving engine (as a new tenant's
first drafts are), and the reviewer's correction is the email's real reply. Each variant of
VARIANTS then trains from a copy of that same database, in its own process, through the real
pipeline (train, evaluate, gate), and is read off its run's report: held-out NLL, chrF, loop
rate, style fidelity (generic, and the shop's own checks on Northwind), and the run's seconds.

Run: .venv/bin/python -m bench.preference [tenant ...]   (default: northwind-neutral)
"""

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.fidelity import _emails, run_figures

VARIANTS = {  # training settings overrides; {} is the defaults
    "sft": {"preference": "none"},
    "sft+dpo": {"preference": "after_sft", "preference_reference": "sft"},
}


def _environment(work: Path) -> None:
    os.environ.update(
        DRAFTLOOP_VAR_DIR=str(work),
        DRAFTLOOP_DATABASE_URL=f"sqlite:///{work / 'bench.db'}",
        DRAFTLOOP_MODEL_CACHE_DIR=str(Path("var/models").resolve()),
        DRAFTLOOP_EVAL_DRAFT_EXAMPLES="100",  # every held-out email
    )


def drafted_history(tenant: str, work: Path) -> dict:
    """The tenant's emails drafted by the base model and corrected with their real replies."""
    _environment(work)
    from agent.base_model import load_base_model
    from agent.drafting import Drafter
    from agent.prompt import IncomingEmail
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role
    from feedback.samples import SampleEmail, record_history
    from migrations import upgrade
    from training.dataset import email_row
    from training.evaluate import greedy_drafts

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    instructions, history = _emails(tenant)
    loaded = load_base_model(settings)
    rows = [
        email_row(
            instructions, IncomingEmail(e["sender"], e["subject"], e["body"]), e["reply"], loaded.tokenizer, settings
        )
        for e in history
    ]
    drafter = Drafter.local(loaded, settings.model_copy(update={"max_queue": len(rows)}))
    started = time.perf_counter()
    try:
        drafts = greedy_drafts(drafter, rows, {"base": None}, settings.reply_length(None))["base"]
    finally:
        drafter.close()
    seconds = time.perf_counter() - started
    with session_scope() as session:
        row = service.create_tenant(session, name=tenant, slug=tenant, instructions=instructions)
        reviewer, _ = service.create_api_key(session, row, name="bench reviewer", role=Role.reviewer)
        emails = [SampleEmail(id=str(i), **email) for i, email in enumerate(history)]
        texts = [(draft.text, draft.finish_reason) for draft in drafts]
        record_history(session, row.id, reviewer, emails, settings.heldout_fraction, drafts=texts)
    return {"emails": len(rows), "drafting_seconds": round(seconds, 1)}


def run_variant(tenant: str, variant: str, prepared: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"draftloop-preference-{tenant}-{variant}-"))
    for path in prepared.glob("bench.db*"):  # with SQLite's write-ahead log, if it was not checkpointed
        shutil.copy(path, work / path.name)
    _environment(work)
    from core.db import session_scope
    from core.settings import get_settings
    from feedback.service import get_tenant_by_slug
    from migrations import upgrade
    from training.pipeline import execute_run
    from training.runs import create_run

    settings = get_settings()
    upgrade(settings.resolved_database_url)  # the prepared database, to this code's schema
    with session_scope() as session:
        tenant_id = get_tenant_by_slug(session, tenant).id
        run_id = create_run(session, tenant_id, trigger="bench", requested_by="bench", overrides=VARIANTS[variant]).id
    started = time.perf_counter()
    status = execute_run(run_id, settings, echo=lambda line: print(f"[{tenant} {variant}] {line}", flush=True))
    figures = run_figures(tenant, run_id, status, time.perf_counter() - started)
    figures["preference"] = (figures["selection"] or {}).get("preference")
    return figures


def main() -> None:
    from bench.report import save

    tenants = sys.argv[1:] or ["northwind-neutral"]
    figures: dict = {}
    context = multiprocessing.get_context("spawn")
    for tenant in tenants:
        prepared = Path(tempfile.mkdtemp(prefix=f"draftloop-preference-{tenant}-"))
        with context.Pool(1) as pool:
            figures[tenant] = {"history": pool.apply(drafted_history, (tenant, prepared))}
        print(f"{tenant}: {json.dumps(figures[tenant]['history'])}", flush=True)
        for variant in VARIANTS:
            with context.Pool(1) as pool:
                result = pool.apply(run_variant, (tenant, variant, prepared))
            figures[tenant][variant] = result
            shown = {k: result[k] for k in ("status", "run_seconds", "training_seconds", "candidate", "preference")}
            print(f"{tenant} {variant}: {json.dumps(shown)}", flush=True)
    save("preference" if tenants == ["northwind-neutral"] else "preference-" + "-".join(tenants), figures)


if __name__ == "__main__":
    main()
