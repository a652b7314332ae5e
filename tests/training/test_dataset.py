import json

from datasets import load_dataset

from feedback import service
from feedback.models import Role, Split, Verdict
from tests.factories import make_draft, make_tenant
from tests.training.helpers import add_corrections
from training.dataset import record_snapshot, tenant_dataset, write_jsonl


def test_rows_use_the_drafting_prompt_and_the_final_text(session, tokenizer, model_settings):
    tenant = make_tenant(session, instructions="Answer as Marta.")
    corrections = add_corrections(session, tenant, 12)
    train = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    row = train.rows[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][0][
        "content"
    ] == "Answer as Marta."
    first = next(c for c in corrections if c.id == train.correction_ids[0])
    assert row["completion"] == [{"role": "assistant", "content": first.final_text}]


def test_snapshot_is_identical_when_rebuilt(session, tokenizer, model_settings):
    tenant = make_tenant(session)
    add_corrections(session, tenant, 12)
    first = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    again = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    assert (first.content_hash, first.correction_ids, first.rows) == (
        again.content_hash,
        again.correction_ids,
        again.rows,
    )
    assert first.correction_ids == sorted(first.correction_ids)
    assert record_snapshot(session, first).id == record_snapshot(session, again).id


def test_heldout_corrections_never_appear_in_the_training_set(session, tokenizer, model_settings):
    tenant = make_tenant(session)
    corrections = add_corrections(session, tenant, 40)
    train = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    heldout = tenant_dataset(session, tenant, Split.heldout, tokenizer, model_settings)
    assert heldout.rows and train.rows
    assert not set(train.correction_ids) & set(heldout.correction_ids)
    assert set(heldout.correction_ids) == {c.id for c in corrections if c.split == Split.heldout}
    train_texts = {json.dumps(row, sort_keys=True) for row in train.rows}
    assert not any(json.dumps(row, sort_keys=True) in train_texts for row in heldout.rows)


def test_rejected_duplicate_and_overlong_rows_are_dropped_and_counted(session, tokenizer, model_settings):
    tenant = make_tenant(session)
    add_corrections(session, tenant, 3, reply="Same reply for everyone.")  # same text, different emails: kept
    add_corrections(session, tenant, 2, reply=None, verdict=Verdict.rejected)
    add_corrections(session, tenant, 1, reply="Word " * 2000)
    both = [tenant_dataset(session, tenant, split, tokenizer, model_settings, max_length=300) for split in Split]
    dropped = {}
    for dataset in both:
        for reason, count in dataset.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    assert dropped == {"rejected_without_text": 2, "too_long": 1}
    assert sum(len(d.rows) for d in both) == 3


def test_exact_and_normalised_duplicates_are_dropped(session, tokenizer, model_settings):
    tenant = make_tenant(session)
    key, _ = service.create_api_key(session, tenant, name="r", role=Role.reviewer)
    texts = ["Hi Dana,\n\nIt ships Monday.", "Hi Dana,\n\nIt ships Monday.", "hi dana,   it ships monday."]
    for text in texts:
        draft = make_draft(session, tenant, sender="Dana <d@example.com>", body="Where is it?")
        service.submit_correction(
            session,
            draft=draft,
            correction=service.CorrectionInput(Verdict.edited, text),
            reviewer_key=key,
            idempotency_key=None,
            heldout_fraction=0.0,
        )
    train = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    assert len(train.rows) == 1 and train.dropped == {"duplicate": 1, "near_duplicate": 1}


def test_exported_jsonl_loads_with_datasets(session, tokenizer, model_settings, tmp_path):
    tenant = make_tenant(session)
    add_corrections(session, tenant, 8)
    train = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    path = write_jsonl(train.rows, tmp_path / "train.jsonl")
    loaded = load_dataset("json", data_files=str(path), split="train")
    assert loaded.column_names == ["prompt", "completion"] and loaded.to_list() == train.rows
