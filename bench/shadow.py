"""A shadow run on the sample tenant: does a candidate prove itself on live mail, and what does
drafting in shadow cost?

The sample tenant (Northwind Cycles) gets the reviewers' corrections of its first HISTORY[0]
emails and a run with the defaults (its candidate, promoted, is the champion); then those of the
next emails up to HISTORY[1], `shadow_corrections` = N and a second run, whose candidate, if the
gate passes it, goes into shadow (one the gate rejects is put in shadow all the same, and the
figures say so: the live comparison is what is measured). Then the emails the service has never
stored (the sample's rest: held out from both runs) arrive one by one through the API: each is
drafted by the champion and the shadow in the same batch (POST /v1/drafts) and corrected with
the email's real reply as the final text, until the shadow is decided.

Figures: both runs' gate decisions; n, the mean chrF and edit words of each, the mean difference
and its 95% interval, the decision and its reason; and the drafting cost of shadowing: COST_EMAILS
emails drafted at once by the champion alone and with the shadow beside it (tokens/s of the
champion's drafts and of all, and the wall time).

Run: .venv/bin/python -m bench.shadow [N]   (default N: 30)
"""

import os
import sys
import tempfile
import time
from pathlib import Path

HISTORY = (60, 130)  # the first run's emails, then the second's (the sample's first 130, as bench.fidelity)
COST_EMAILS = 16
MAX_NEW_TOKENS = 256


def _run(session_scope, settings, tenant_id: int) -> dict:
    from training.models import TrainingRun
    from training.pipeline import execute_run
    from training.runs import create_run

    with session_scope() as session:
        run_id = create_run(session, tenant_id, trigger="bench", requested_by="bench").id
    started = time.perf_counter()
    status = execute_run(run_id, settings, echo=lambda line: print(f"[shadow] {line}", flush=True))
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        return {
            "run": run_id,
            "status": status,
            "reason": run.decision_reason,
            "seconds": time.perf_counter() - started,
        }


def _cost(drafter, instructions: str, emails, champion, shadow_ref, tenant_id: int) -> dict:
    """COST_EMAILS emails drafted at once by the champion alone, then with the shadow beside it."""
    from agent.prompt import IncomingEmail

    prompts = [drafter.prompt(instructions, IncomingEmail(e.sender, e.subject, e.body)) for e in emails]
    figures = {}
    for name, with_shadow in (("champion alone", False), ("champion and shadow", True)):
        started = time.perf_counter()
        streams = drafter.submit_many(prompts, max_new_tokens=MAX_NEW_TOKENS, adapter=champion, tenant_id=tenant_id)
        shadows = []
        if with_shadow:
            shadows = drafter.submit_shadow(
                prompts, max_new_tokens=MAX_NEW_TOKENS, adapter=shadow_ref, guard=drafter.guard, tenant_id=tenant_id
            )
            assert shadows is not None, "the shadow's drafts were shed"
        champion_tokens = sum(len(s.result()) for s in streams)
        champion_s = max(s.finished_at for s in streams) - started
        all_tokens = champion_tokens + sum(len(s.result()) for s in shadows)
        wall = time.perf_counter() - started
        figures[name] = {
            "champion_tokens": champion_tokens,
            "champion_seconds": round(champion_s, 2),
            "champion_tokens_per_s": round(champion_tokens / champion_s, 1),
            "all_tokens": all_tokens,
            "wall_seconds": round(wall, 2),
            "all_tokens_per_s": round(all_tokens / wall, 1),
        }
        print(f"[shadow] cost, {name}: {figures[name]}", flush=True)
    alone, beside = figures["champion alone"], figures["champion and shadow"]
    figures["champion_slowdown"] = round(beside["champion_seconds"] / alone["champion_seconds"], 3)
    return figures


def main() -> None:
    needed = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    work = Path(tempfile.mkdtemp(prefix="draftloop-shadow-"))
    os.environ.update(
        DRAFTLOOP_VAR_DIR=str(work),
        DRAFTLOOP_DATABASE_URL=f"sqlite:///{work / 'bench.db'}",
        DRAFTLOOP_MODEL_CACHE_DIR=str(Path("var/models").resolve()),
        DRAFTLOOP_RATE_LIMIT_PER_KEY="100000/minute",
    )
    from fastapi.testclient import TestClient

    from agent.drafting import get_drafter
    from api.app import create_app
    from bench.report import save
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role, Tenant
    from feedback.samples import load_sample_tenant, record_history
    from migrations import upgrade
    from training import registry, shadow
    from training.models import AdapterStatus

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    sample = load_sample_tenant()
    with session_scope() as session:
        tenant = service.create_tenant(session, name=sample.name, slug=sample.slug, instructions=sample.instructions)
        tenant_id = tenant.id
        reviewer, _ = service.create_api_key(session, tenant, name="bench reviewer", role=Role.reviewer)
        _, agent_key = service.create_api_key(session, tenant, name="bench inbox", role=Role.agent)
        _, reviewer_key = service.create_api_key(session, tenant, name="bench reviewers", role=Role.reviewer)
        record_history(session, tenant_id, reviewer, sample.emails[: HISTORY[0]], settings.heldout_fraction)
    first = _run(session_scope, settings, tenant_id)
    with session_scope() as session:
        reviewer = service.list_api_keys(session, tenant_id)[0]
        emails = sample.emails[HISTORY[0] : HISTORY[1]]
        record_history(session, tenant_id, reviewer, emails, settings.heldout_fraction)
        session.get(Tenant, tenant_id).shadow_corrections = needed
    second = _run(session_scope, settings, tenant_id)
    drafter = get_drafter(settings)
    with session_scope() as session:
        candidate = registry.list_adapters(session, tenant_id)[-1]
        if candidate.status != AdapterStatus.shadow:
            registry.start_shadow(
                session, settings, candidate, actor="bench", reason=f"bench: {candidate.status} by the gate, measured"
            )
        champion = registry.champion_ref(session, settings, tenant_id, drafter.fingerprint)
        shadow_ref = registry.serving_ref(session, settings, candidate, drafter.fingerprint)
    arrivals = sample.emails[HISTORY[1] :]
    cost = _cost(drafter, sample.instructions, arrivals[:COST_EMAILS], champion, shadow_ref, tenant_id)

    corrected, started = 0, time.perf_counter()
    with TestClient(create_app()) as client:
        for email in arrivals:
            body = {"sender": email.sender, "subject": email.subject, "body": email.body}
            draft = client.post("/v1/drafts", json=body, headers={"X-API-Key": agent_key})
            assert draft.status_code == 201, draft.text
            draft = draft.json()
            same = email.reply.strip() == draft["draft_text"].strip()
            correction = {"verdict": "accepted"} if same else {"verdict": "edited", "final_text": email.reply}
            stored = client.post(
                f"/v1/drafts/{draft['id']}/correction", json=correction, headers={"X-API-Key": reviewer_key}
            )
            assert stored.status_code == 201, stored.text
            corrected += 1
            status = client.get("/v1/shadow", headers={"X-API-Key": reviewer_key}).json()
            if status["live"] is None:
                break
            live = status["live"]
            print(f"[shadow] {corrected} corrected, {live['scored']} scored: {live['difference']}", flush=True)
    with session_scope() as session:
        status = shadow.status(session, tenant_id)
        decision = status.last_decision
        figures = {
            "shadow_corrections": needed,
            "first_run": first,
            "second_run": second,
            "arrivals_corrected": corrected,
            "arrival_seconds": round(time.perf_counter() - started, 1),
            "decided": decision is not None,
            "decision": decision.action if decision else None,
            "reason": decision.reason if decision else None,
            "scores": decision.scores if decision else status.live.as_json(),
            "drafting_cost": cost,
        }
    save("shadow", figures)


if __name__ == "__main__":
    main()
