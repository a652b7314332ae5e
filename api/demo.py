"""The main job, end to end on the embedded defaults: a tenant, its keys, real drafts from the
base model through the HTTP API, and a reviewer's correction stored in the database."""

import textwrap
import time

import typer
from fastapi.testclient import TestClient

from api.app import create_app
from core.db import session_scope
from core.errors import NotFound
from core.settings import get_settings
from feedback import service
from feedback.models import ApiKey, Role, Verdict
from feedback.samples import load_sample_tenant
from migrations import upgrade


def _show(title: str, text: str) -> None:
    typer.secho(title, bold=True)
    typer.echo(textwrap.indent(text.strip(), "    "))


def _setup_tenant() -> tuple[str, str]:
    sample = load_sample_tenant()
    with session_scope() as session:
        try:
            tenant = service.get_tenant_by_slug(session, sample.slug)
        except NotFound:
            tenant = service.create_tenant(
                session, name=sample.name, slug=sample.slug, instructions=sample.instructions
            )
        _, agent_key = service.create_api_key(session, tenant, name="demo agent", role=Role.agent)
        _, reviewer_key = service.create_api_key(session, tenant, name="demo reviewer", role=Role.reviewer)
    return agent_key, reviewer_key


def load_samples(limit: int | None, max_new_tokens: int, batch_size: int = 8) -> str:
    """The sample tenant with its history: each sample email drafted by the current model (in
    batches) and corrected by the sample reviewer. Emails already loaded are skipped."""
    from agent.drafting import get_drafter
    from agent.prompt import IncomingEmail

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    sample = load_sample_tenant()
    with session_scope() as session:
        try:
            tenant = service.get_tenant_by_slug(session, sample.slug)
        except NotFound:
            tenant = service.create_tenant(
                session, name=sample.name, slug=sample.slug, instructions=sample.instructions
            )
        loaded = {d.subject for d in service.list_drafts(session, tenant.id, limit=100_000)}
        reviewer, _ = service.create_api_key(session, tenant, name="sample reviewer", role=Role.reviewer)
        tenant_id, instructions, reviewer_id = tenant.id, tenant.instructions, reviewer.id
    todo = [email for email in sample.emails[:limit] if email.subject not in loaded]
    drafter = get_drafter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        incoming = [IncomingEmail(email.sender, email.subject, email.body) for email in batch]
        results = drafter.draft_many(instructions, incoming, max_new_tokens=max_new_tokens)
        with session_scope() as session:
            reviewer = session.get(ApiKey, reviewer_id)
            for email, result in zip(batch, results, strict=True):
                draft = service.record_draft(
                    session,
                    tenant_id=tenant_id,
                    created_by_key_id=None,
                    sender=email.sender,
                    subject=email.subject,
                    body=email.body,
                    draft_text=result.text,
                    base_model=drafter.model_id,
                    adapter_id=None,
                    generation={"max_new_tokens": max_new_tokens, "decoding": "greedy"},
                    prompt_tokens=result.prompt_tokens,
                    tokens_generated=result.tokens_generated,
                    finish_reason=result.finish_reason,
                    latency_ms=result.latency_ms,
                )
                service.submit_correction(
                    session,
                    draft=draft,
                    correction=service.CorrectionInput(Verdict.edited, email.reply),
                    reviewer_key=reviewer,
                    idempotency_key=f"sample-{email.id}",
                    heldout_fraction=settings.heldout_fraction,
                )
        typer.echo(f"  drafted and corrected {start + len(batch)}/{len(todo)}")
    return sample.slug


def run_demo(emails: int) -> None:
    settings = get_settings()
    started = time.perf_counter()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo(f"database: {settings.resolved_database_url}")
    agent_key, reviewer_key = _setup_tenant()
    sample = load_sample_tenant()

    client = TestClient(create_app())
    typer.echo(f"loading the base model ({settings.base_model}) and drafting {emails} replies ...")
    drafts = []
    for email in sample.emails[:emails]:
        response = client.post(
            "/v1/drafts",
            json={"sender": email.sender, "subject": email.subject, "body": email.body},
            headers={"X-API-Key": agent_key},
        )
        response.raise_for_status()
        draft = response.json()
        drafts.append((email, draft))
        typer.secho(f"\n=== draft {draft['id']}: {email.subject}", fg="cyan", bold=True)
        _show(f"incoming from {email.sender}:", email.body)
        _show(
            f"draft ({draft['tokens_generated']} tokens in {draft['latency_ms'] / 1000:.1f} s, "
            f"{draft['finish_reason']}, {draft['base_model']}):",
            draft["draft_text"],
        )

    email, draft = drafts[0]
    response = client.post(
        f"/v1/drafts/{draft['id']}/correction",
        json={"verdict": "edited", "final_text": email.reply},
        headers={"X-API-Key": reviewer_key, "Idempotency-Key": f"demo-{draft['id']}"},
    )
    response.raise_for_status()
    stored = client.get(f"/v1/drafts/{draft['id']}", headers={"X-API-Key": reviewer_key}).json()["correction"]
    typer.secho(f"\n=== correction {stored['id']} stored for draft {draft['id']}", fg="green", bold=True)
    typer.echo(f"verdict {stored['verdict']} by {stored['reviewer']}, split {stored['split']}")
    _show("final text:", stored["final_text"])

    queue = client.get("/v1/review-queue", headers={"X-API-Key": reviewer_key}).json()
    typer.echo(f"\nreview queue: {queue['pending']} drafts waiting; demo took {time.perf_counter() - started:.0f} s")
