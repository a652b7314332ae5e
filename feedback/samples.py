"""The bundled sample tenant: incoming emails with the replies its reviewers settled on."""

import json
from dataclasses import dataclass
from pathlib import Path

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


def load_sample_tenant(slug: str = "northwind") -> SampleTenant:
    folder = SAMPLES_DIR / slug
    tenant = json.loads((folder / "tenant.json").read_text())
    lines = (folder / "emails.jsonl").read_text().splitlines()
    emails = [SampleEmail(**json.loads(line)) for line in lines if line.strip()]
    assert len({email.id for email in emails}) == len(emails), "sample ids must be unique"
    return SampleTenant(slug=tenant["slug"], name=tenant["name"], instructions=tenant["instructions"], emails=emails)
