"""Small factory functions for test data."""

import uuid

from sqlalchemy.orm import Session

from feedback import service
from feedback.models import ApiKey, Correction, Draft, Role, Tenant, Verdict


def make_tenant(session: Session, instructions: str = "You answer for a bicycle shop.") -> Tenant:
    slug = f"t-{uuid.uuid4().hex[:10]}"
    return service.create_tenant(session, name=f"Tenant {slug}", slug=slug, instructions=instructions)


def make_key(session: Session, tenant: Tenant, role: Role = Role.reviewer) -> tuple[ApiKey, str]:
    return service.create_api_key(session, tenant, name=f"{role}-key", role=role)


def make_draft(session: Session, tenant: Tenant, text: str = "Hello, thanks for writing.", **fields) -> Draft:
    values = dict(
        sender="Dana <dana@example.com>",
        subject="Brake squeal",
        body="My front brake squeals.",
        draft_text=text,
        base_model="tiny",
        adapter_id=None,
        generation={"max_new_tokens": 16},
        prompt_tokens=10,
        tokens_generated=5,
        finish_reason="stop",
        latency_ms=1.0,
    )
    return service.record_draft(session, tenant_id=tenant.id, created_by_key_id=None, **(values | fields))


def make_correction(
    session: Session, draft: Draft, key: ApiKey, verdict: Verdict, final_text: str | None = None
) -> Correction:
    correction, _ = service.submit_correction(
        session,
        draft=draft,
        correction=service.CorrectionInput(verdict, final_text),
        reviewer_key=key,
        idempotency_key=None,
        heldout_fraction=0.2,
    )
    return correction
