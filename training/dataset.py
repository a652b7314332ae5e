"""Datasets from a tenant's corrections, in TRL's conversational formats: SFT rows
(prompt/completion: the reviewer's text) and preference pairs (prompt/chosen/rejected: the
reviewer's text over the draft they edited or rejected).

The prompt comes from the same builder the agent drafts with, so the model is trained on
exactly what it sees when drafting. A snapshot is reproducible: the sorted correction ids and
a content hash are recorded, and rebuilding it gives the same rows and the same hash.
"""

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import PreTrainedTokenizerBase

from agent.prompt import IncomingEmail, build_prompt_completion, fit_messages
from core.errors import Invalid
from core.settings import Settings
from feedback.models import Correction, Draft, Split, Tenant, Verdict
from training.config import TrainConfig
from training.models import DatasetSnapshot, SnapshotKind


@dataclass(frozen=True)
class Dataset:
    tenant_id: int
    split: Split
    kind: SnapshotKind
    instructions: str
    max_length: int
    # sft: {"prompt": [system, user], "completion": [assistant]};
    # preference: {"prompt": [system, user], "chosen": [assistant], "rejected": [assistant]}
    rows: list[dict]
    correction_ids: list[int]  # the corrections behind the rows, sorted
    dropped: dict[str, int]  # reason -> count
    content_hash: str
    max_correction_id: int  # the newest correction considered, kept or dropped


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def row_tokens(tokenizer: PreTrainedTokenizerBase, row: dict) -> int:
    """Prompt plus completion tokens, as the trainer will see them (with the end-of-turn token)."""
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    return len(tokenizer(full, add_special_tokens=False).input_ids)


def email_row(
    instructions: str, email: IncomingEmail, reply: str, tokenizer: PreTrainedTokenizerBase, settings: Settings
) -> dict:
    """One row: the prompt the agent would draft this email with (fitted to the prompt budget), and the reply."""
    row = build_prompt_completion(instructions, email, reply, quoted_history_chars=settings.quoted_history_chars)
    row["prompt"] = fit_messages(tokenizer, row["prompt"], settings.max_prompt_tokens)
    return row


def preference_pair(sft_row: dict, draft_text: str) -> dict:
    """The pair an SFT row makes with the draft the reviewer replaced: chosen is the row's reply."""
    rejected = {"role": "assistant", "content": draft_text.replace("\r\n", "\n").strip()}
    return {"prompt": sft_row["prompt"], "chosen": sft_row["completion"], "rejected": [rejected]}


def build_dataset(
    session: Session,
    *,
    tenant_id: int,
    instructions: str,
    split: Split,
    tokenizer: PreTrainedTokenizerBase,
    settings: Settings,
    max_length: int,
    kind: SnapshotKind = SnapshotKind.sft,
    up_to_correction_id: int | None = None,
) -> Dataset:
    """Rows from the tenant's corrections in one split; empty, over-length and duplicate rows are
    dropped with a count per reason. Rejected drafts without a final text stay stored but out.
    Preference pairs come from the same rows, where the reviewer's text replaced a draft: an
    accepted draft, a correction that kept the draft's text, and a history without a draft make
    no pair. Corrections never change, so up_to_correction_id rebuilds an earlier snapshot exactly."""
    if kind == SnapshotKind.preference and split != Split.train:
        raise Invalid("preference pairs come from the train split only: held-out corrections judge, never train")
    query = (
        select(Correction, Draft)
        .join(Draft, Draft.id == Correction.draft_id)
        .where(Correction.tenant_id == tenant_id, Correction.split == split)
        .order_by(Correction.id)
    )
    if up_to_correction_id is not None:
        query = query.where(Correction.id <= up_to_correction_id)
    pairs = session.execute(query).all()
    rows, ids, dropped, seen_exact, seen_normalised = [], [], Counter(), set(), set()
    for correction, draft in pairs:
        reply = (correction.final_text or "").replace("\r\n", "\n").strip()
        if not reply:
            dropped["rejected_without_text" if correction.verdict == Verdict.rejected else "empty"] += 1
            continue
        email = IncomingEmail(sender=draft.sender, subject=draft.subject, body=draft.body)
        row = email_row(instructions, email, reply, tokenizer, settings)
        exact = json.dumps(row, sort_keys=True)
        normalised = (_normalised(email.subject + "\n" + email.body), _normalised(reply))
        if exact in seen_exact:
            dropped["duplicate"] += 1
        elif normalised in seen_normalised:
            dropped["near_duplicate"] += 1
        elif row_tokens(tokenizer, row) > max_length:
            dropped["too_long"] += 1
        elif kind == SnapshotKind.sft:
            rows.append(row)
            ids.append(correction.id)
        elif correction.verdict == Verdict.accepted:
            dropped["accepted"] += 1
        elif not draft.draft_text.strip():
            dropped["no_draft"] += 1
        elif _normalised(draft.draft_text) == _normalised(reply):
            dropped["draft_kept"] += 1
        else:
            pair = preference_pair(row, draft.draft_text)
            if row_tokens(tokenizer, {"prompt": pair["prompt"], "completion": pair["rejected"]}) > max_length:
                dropped["too_long"] += 1
            else:
                rows.append(pair)
                ids.append(correction.id)
        seen_exact.add(exact)
        seen_normalised.add(normalised)
    content_hash = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return Dataset(
        tenant_id=tenant_id,
        split=split,
        kind=kind,
        instructions=instructions,
        max_length=max_length,
        rows=rows,
        correction_ids=ids,
        dropped=dict(sorted(dropped.items())),
        content_hash=content_hash,
        max_correction_id=max((c.id for c, _ in pairs), default=0),
    )


def tenant_dataset(
    session: Session,
    tenant: Tenant,
    split: Split,
    tokenizer: PreTrainedTokenizerBase,
    settings: Settings,
    max_length: int = TrainConfig.max_length,
    kind: SnapshotKind = SnapshotKind.sft,
) -> Dataset:
    """The tenant's rows in one split as of now, with its current instructions, at a run's
    max_length (the default run's unless given)."""
    return build_dataset(
        session,
        tenant_id=tenant.id,
        instructions=tenant.instructions,
        split=split,
        tokenizer=tokenizer,
        settings=settings,
        max_length=max_length,
        kind=kind,
    )


def record_snapshot(session: Session, dataset: Dataset) -> DatasetSnapshot:
    """The snapshot row of a dataset; the same content maps to the same row."""
    snapshot = session.scalar(
        select(DatasetSnapshot).where(
            DatasetSnapshot.tenant_id == dataset.tenant_id,
            DatasetSnapshot.split == dataset.split,
            DatasetSnapshot.kind == dataset.kind,
            DatasetSnapshot.content_hash == dataset.content_hash,
        )
    )
    if snapshot is None:
        snapshot = DatasetSnapshot(
            tenant_id=dataset.tenant_id,
            split=dataset.split,
            kind=dataset.kind,
            content_hash=dataset.content_hash,
            correction_ids=dataset.correction_ids,
            instructions=dataset.instructions,
            max_length=dataset.max_length,
            row_count=len(dataset.rows),
            dropped=dataset.dropped,
            max_correction_id=dataset.max_correction_id,
        )
        session.add(snapshot)
        session.flush()
    return snapshot


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Rows as JSONL that `datasets.load_dataset("json", ...)` and TRL's SFTTrainer (or, for
    preference pairs, DPOTrainer) read as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
