"""The bundled sample tenant: incoming emails with the replies its reviewers settled on."""

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from feedback import service
from feedback.models import ApiKey, Verdict

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"


@dataclass(frozen=True)
class SampleEmail:
    id: str
    sender: str
    subject: str
    body: str
    reply: str


@dataclass(frozen=True)
class SampleTenant:
    slug: str
    name: str
    instructions: str
    emails: list[SampleEmail]


def load_emails(path: Path) -> list[SampleEmail]:
    """Bundled emails with their replies, one JSON object a line."""
    emails = [SampleEmail(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    assert len({email.id for email in emails}) == len(emails), "sample ids must be unique"
    return emails


def load_sample_tenant(slug: str = "northwind") -> SampleTenant:
    folder = SAMPLES_DIR / slug
    tenant = json.loads((folder / "tenant.json").read_text())
    emails = load_emails(folder / "emails.jsonl")
    return SampleTenant(slug=tenant["slug"], name=tenant["name"], instructions=tenant["instructions"], emails=emails)


def record_history(
    session: Session,
    tenant_id: int,
    reviewer: ApiKey,
    emails: list[SampleEmail],
    heldout_fraction: float,
    drafts: list[tuple[str, str]] | None = None,
) -> None:
    """The emails with their reviewers' corrections, without drafting them: for benchmarks and
    tests that need a tenant's corrections and not the drafts (the demo drafts for real). With
    `drafts` ((text, finish reason) per email, drafted elsewhere) the corrections replace those."""
    for index, email in enumerate(emails):
        text, finish_reason = drafts[index] if drafts else ("", "stop")
        draft = service.record_draft(
            session,
            tenant_id=tenant_id,
            created_by_key_id=None,
            sender=email.sender,
            subject=email.subject,
            body=email.body,
            draft_text=text,
            base_model="(sample history)" if drafts else "(sample history, not drafted)",
            adapter_id=None,
            generation={},
            prompt_tokens=0,
            tokens_generated=0,
            finish_reason=finish_reason,
            latency_ms=0.0,
        )
        service.submit_correction(
            session,
            draft=draft,
            correction=service.CorrectionInput(Verdict.edited, email.reply),
            reviewer_key=reviewer,
            idempotency_key=None,
            heldout_fraction=heldout_fraction,
        )
