import json

import pytest
from datasets import load_dataset
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy import select
from typer.testing import CliRunner

from agent.adapters import AdapterRef
from api.app import create_app
from api.cli import app as cli_app
from core.db import session_scope
from core.errors import Invalid
from core.settings import get_settings
from feedback import service
from feedback.models import Role, Split, Verdict
from tests.factories import make_correction, make_draft, make_tenant
from tests.training.helpers import FAST, ROWS, add_corrections, start, tenant_with_history
from training.config import TrainConfig
from training.dataset import preference_pair, record_snapshot, tenant_dataset, write_jsonl
from training.models import Adapter, DatasetSnapshot, RunStatus, SnapshotKind, TrainingRun
from training.pipeline import execute_run
from training.train import load_training_base, train_adapter

DRAFTS = [f"Dear customer, we have received your message about order {n}." for n in range(len(ROWS))]
PAIRS = [preference_pair(row, draft) for row, draft in zip(ROWS, DRAFTS, strict=True)]
FAST_DPO = FAST | {"epochs": 2, "validation_fraction": 0}


def test_pairs_come_from_edited_and_rejected_drafts_of_the_train_split(session, tokenizer, model_settings):
    tenant = make_tenant(session, instructions="Answer as Marta.")
    corrections = add_corrections(session, tenant, 40)  # drafts "draft", edited to the house style
    key, _ = service.create_api_key(session, tenant, name="second reviewer", role=Role.reviewer)
    kept = make_draft(session, tenant, "Thanks, it ships Monday.", body="Is it shipped?")
    make_correction(session, kept, key, Verdict.edited, " Thanks,  it ships Monday. ", heldout_fraction=0)
    accepted = make_draft(session, tenant, "It ships Monday.", body="When?")
    make_correction(session, accepted, key, Verdict.accepted, heldout_fraction=0)
    rejected = make_draft(session, tenant, "No idea.", body="Where is my bike?")
    rejection = make_correction(session, rejected, key, Verdict.rejected, "Hi, your bike is ready.", heldout_fraction=0)
    undrafted = make_draft(session, tenant, "", body="Do you sell tyres?")
    make_correction(session, undrafted, key, Verdict.edited, "Yes, we do.", heldout_fraction=0)

    pairs = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings, kind=SnapshotKind.preference)
    train = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings)
    heldout_ids = {c.id for c in corrections if c.split == Split.heldout}
    assert heldout_ids and not heldout_ids & set(pairs.correction_ids)
    assert set(pairs.correction_ids) < set(train.correction_ids)
    assert pairs.dropped == {"accepted": 1, "draft_kept": 1, "no_draft": 1}
    by_id = dict(zip(pairs.correction_ids, pairs.rows, strict=True))
    assert by_id[rejection.id]["rejected"] == [{"role": "assistant", "content": "No idea."}]
    assert by_id[rejection.id]["chosen"] == [{"role": "assistant", "content": "Hi, your bike is ready."}]
    for correction_id, pair in by_id.items():  # the SFT row's prompt and reply, beside the draft
        row = train.rows[train.correction_ids.index(correction_id)]
        assert (pair["prompt"], pair["chosen"]) == (row["prompt"], row["completion"])

    with pytest.raises(Invalid, match="train split only"):
        tenant_dataset(session, tenant, Split.heldout, tokenizer, model_settings, kind=SnapshotKind.preference)
    snapshot = record_snapshot(session, pairs)
    assert (snapshot.kind, snapshot.row_count) == ("preference", len(pairs.rows))
    again = tenant_dataset(session, tenant, Split.train, tokenizer, model_settings, kind=SnapshotKind.preference)
    assert again.content_hash == pairs.content_hash != train.content_hash
    assert record_snapshot(session, again).id == snapshot.id != record_snapshot(session, train).id


def test_exported_pairs_are_read_by_datasets_as_dpo_rows(tmp_path):
    path = write_jsonl(PAIRS, tmp_path / "pairs.jsonl")
    loaded = load_dataset("json", data_files=str(path), split="train")
    assert loaded.column_names == ["prompt", "chosen", "rejected"] and loaded[0] == PAIRS[0]


def margins(model, tokenizer, pairs) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair's reply under the model."""
    from training.evaluate import example_nll

    chosen = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    rejected = [{"prompt": p["prompt"], "completion": p["rejected"]} for p in pairs]
    lengths = [len(tokenizer(p["chosen"][0]["content"]).input_ids) for p in pairs]
    lengths_r = [len(tokenizer(p["rejected"][0]["content"]).input_ids) for p in pairs]
    nll_c, nll_r = example_nll(model, tokenizer, chosen), example_nll(model, tokenizer, rejected)
    return [r * lr - c * lc for c, r, lc, lr in zip(nll_c, nll_r, lengths, lengths_r, strict=True)]


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_dpo_after_sft_widens_the_margin_of_the_reviewers_text(tiny_base_dir, tokenizer, tmp_path, reference):
    sft_only = TrainConfig(**FAST_DPO)
    with_dpo = TrainConfig(
        **FAST_DPO, preference="after_sft", preference_reference=reference, dpo_learning_rate=1e-2, dpo_epochs=2
    )
    results, models = {}, {}
    for name, config in {"sft": sft_only, "dpo": with_dpo}.items():
        model = load_training_base(str(tiny_base_dir), config)
        progress = []
        report = lambda *step, seen=progress: seen.append(step)  # noqa: E731
        results[name] = train_adapter(model, tokenizer, ROWS, config, tmp_path / name, report, pairs=PAIRS)
        models[name] = PeftModel.from_pretrained(load_training_base(str(tiny_base_dir), config), tmp_path / name)
        assert progress[-1][:2] == (results[name].steps, results[name].steps)
    stage = results["dpo"].selection["preference"]
    assert (stage["stage"], stage["pairs"], stage["reference"]) == ("after_sft", len(PAIRS), reference)
    assert stage["steps"] == 8 and results["dpo"].steps == results["sft"].steps + 8  # 2 pairs a step, 2 epochs
    assert any(entry.get("stage") == "dpo" for entry in results["dpo"].loss_history)
    assert json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())["r"] == with_dpo.rank
    sft_margin = sum(margins(models["sft"], tokenizer, PAIRS))
    dpo_margin = sum(margins(models["dpo"], tokenizer, PAIRS))
    assert dpo_margin > sft_margin + 1.0, (sft_margin, dpo_margin)


def test_dpo_alone_against_the_champion_as_served(tiny_base_dir, tokenizer, tmp_path):
    config = TrainConfig(**FAST_DPO)
    train_adapter(load_training_base(str(tiny_base_dir), config), tokenizer, ROWS, config, tmp_path / "champion")
    champion = AdapterRef(id=7, path=tmp_path / "champion", scale=0.5)
    alone = TrainConfig(**FAST_DPO, preference="alone", preference_reference="champion", dpo_learning_rate=1e-2)
    result = train_adapter(
        load_training_base(str(tiny_base_dir), alone),
        tokenizer,
        ROWS,
        alone,
        tmp_path / "dpo",
        pairs=PAIRS,
        champion=champion,
    )
    stage = result.selection["preference"]
    assert stage["reference"] == "champion (adapter 7, scale 0.5)" and stage["steps"] == result.steps == 4
    assert "learning_rates_tried" not in result.selection  # no SFT stage
    with pytest.raises(Invalid, match="needs at least 4 preference pairs"):
        train_adapter(
            load_training_base(str(tiny_base_dir), alone), tokenizer, ROWS, alone, tmp_path / "x", pairs=PAIRS[:3]
        )
    with pytest.raises(Invalid, match="preference_reference must be base or champion when preference is alone"):
        TrainConfig.with_overrides({"preference": "alone"})
    with pytest.raises(Invalid, match="preference: Input should be 'none', 'after_sft' or 'alone'"):
        TrainConfig.with_overrides({"preference": "dpo"})


def test_a_run_trains_on_its_pairs_after_sft_and_exports_them(worker_settings, tmp_path):
    tenant, admin_key = tenant_with_history()  # drafts "draft", each edited to the house style
    settings = get_settings()
    first = start(session_scope, tenant)
    assert execute_run(first, settings, echo=lambda _: None) == RunStatus.promoted
    overrides = FAST | {"preference": "after_sft", "preference_reference": "champion", "dpo_learning_rate": 1e-2}
    lines = []
    run_id = start(session_scope, tenant, overrides)
    execute_run(run_id, settings, echo=lines.append)
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        champion = session.scalar(select(Adapter).where(Adapter.training_run_id == first))
        stage = run.report["training"]["selection"]["preference"]
        snapshot = session.get(DatasetSnapshot, run.preference_snapshot_id)
        # the champion as served: at the scale its own validation slice chose (the split hangs on ids)
        assert stage["reference"] == f"champion (adapter {champion.id}, scale {champion.scale:g})"
        assert stage["steps"] > 0
        # the snapshot holds every train-split pair; those of the validation slice's rows are not fitted
        assert snapshot.kind == SnapshotKind.preference and stage["pairs"] > 0
        snapshot_pairs = snapshot.row_count
        assert snapshot_pairs == stage["pairs"] + stage["validation_pairs"]
        assert set(snapshot.correction_ids) <= set(session.get(DatasetSnapshot, run.train_snapshot_id).correction_ids)
        assert run.total_steps == run.step == len(run.loss_history) > stage["steps"]
    assert any(line.startswith("  preference training (after_sft):") for line in lines), lines

    with TestClient(create_app()) as client:
        headers = {"X-API-Key": admin_key}
        exported = client.get(f"/v1/runs/{run_id}/dataset", params={"kind": "preference"}, headers=headers)
        rows = [json.loads(line) for line in exported.text.splitlines()]
        assert exported.status_code == 200 and len(rows) == snapshot_pairs
        assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
        heldout = client.get(
            f"/v1/runs/{run_id}/dataset", params={"kind": "preference", "split": "heldout"}, headers=headers
        )
        assert heldout.status_code == 422 and "train split only" in heldout.text
        none = client.get(f"/v1/runs/{first}/dataset", params={"kind": "preference"}, headers=headers)
        assert none.status_code == 404 and "no preference snapshot" in none.text
    out = tmp_path / "pairs.jsonl"
    cli = CliRunner().invoke(
        cli_app, ["datasets", "export", "--tenant", tenant.slug, "--kind", "preference", "--out", str(out)]
    )
    assert cli.exit_code == 0 and [json.loads(line) for line in out.read_text().splitlines()] == rows, cli.output
