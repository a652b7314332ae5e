"""Organizations, teams and combined adapters: PEFT's weighted combination stored as a new
version, served as PEFT serves it, and evaluated and gated like a trained candidate."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from agent.adapters import AdapterRef, attach
from api.app import create_app
from api.cli import app as cli_app
from core.db import session_scope
from core.errors import Conflict, Invalid
from feedback import service
from feedback.models import Role
from tests.agent.engines import engine_for, plain, prompts
from tests.factories import make_key, make_tenant, random_lora, store_version
from tests.training.helpers import start, tenant_with_history
from training import compose, registry
from training.models import Adapter, AdapterEvent, AdapterStatus, RunStatus, TrainingRun
from training.pipeline import execute_run


@pytest.mark.parametrize(("method", "ranks"), [("cat", (4, 8)), ("linear", (4, 4))])
def test_a_combined_adapter_drafts_as_peft_combines(tiny_model, tiny_base_dir, tmp_path, method, ranks):
    """The stored combination, served by the engine, decodes as PEFT's add_weighted_adapter does
    in memory, with each parent at its served scale (here 0.5 for the organization's)."""
    config = tiny_model.model.config
    parents = [
        (AdapterRef(1, random_lora(config, tmp_path / "org", rank=ranks[0], seed=1), scale=0.5), 0.7),
        (AdapterRef(2, random_lora(config, tmp_path / "team", rank=ranks[1], seed=2)), 0.4),
    ]
    folder = compose.combine(str(tiny_base_dir), parents, method, tmp_path / "out")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == (sum(ranks) if method == "cat" else 4)

    reference = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()
    for ref, _ in parents:
        reference = attach(reference, ref)
    names = [f"adapter-{ref.id}" for ref, _ in parents]
    reference.add_weighted_adapter(names, [w for _, w in parents], "peft", combination_type=method)
    reference.set_adapter("peft")

    engine = engine_for(tiny_model)
    combined = AdapterRef(3, folder)
    for prompt in prompts(tiny_model.tokenizer, 3):
        got = engine.submit(prompt, 12, combined).result(timeout=60)
        assert got == plain(reference, tiny_model.tokenizer, prompt, 12)
        assert got != plain(tiny_model.model, tiny_model.tokenizer, prompt, 12)  # the combination matters
    engine.close()


def _update(folder, layer: str, scale: float) -> torch.Tensor:
    """One projection's LoRA update, B A times its scaling, from an adapter folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    a, b = (next(t for k, t in tensors.items() if f"{layer}.lora_{m}" in k) for m in "AB")
    rank = config["r"]
    return scale * config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank) * (b @ a)


def test_cat_is_exactly_the_weighted_sum_of_the_served_updates(tiny_model, tiny_base_dir, tmp_path):
    """Even for an rsLoRA parent: the combined adapter is stored with scaling 1 (PEFT would keep the
    first parent's rsLoRA flag and scale the sum again by sqrt(r))."""
    from peft import LoraConfig, get_peft_model

    config = tiny_model.model.config
    torch.manual_seed(5)
    rslora = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    for name, parameter in rslora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    rslora.save_pretrained(tmp_path / "org")
    parents = [
        (AdapterRef(1, tmp_path / "org", scale=1.5), 0.6),
        (AdapterRef(2, random_lora(config, tmp_path / "team", rank=8, targets=["q_proj", "v_proj"], seed=3)), 0.3),
    ]
    folder = compose.combine(str(tiny_base_dir), parents, "cat", tmp_path / "out")
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is False
    for layer in ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"):
        expected = sum(weight * _update(ref.path, layer, ref.scale) for ref, weight in parents)
        assert torch.allclose(_update(folder, layer, 1.0), expected, atol=1e-6)


def test_teams_and_compositions_are_checked_before_a_run_is_queued(session, run_settings, tiny_model, tmp_path):
    organization, team, other = (make_tenant(session) for _ in range(3))
    config = tiny_model.model.config
    with pytest.raises(Invalid, match="belongs to no organization"):
        compose.plan(session, run_settings, team, method="cat", organization_weight=0.5, team_weight=0.5)
    service.set_organization(session, team, organization)
    with pytest.raises(Invalid, match="cannot be its own organization"):
        service.set_organization(session, other, other)
    with pytest.raises(Invalid, match="is a team of another organization"):
        service.set_organization(session, other, team)
    with pytest.raises(Invalid, match="has teams of its own"):
        service.set_organization(session, organization, other)
    with pytest.raises(Conflict, match="the organization has no champion adapter"):
        compose.plan(session, run_settings, team, method="cat", organization_weight=0.5, team_weight=0.5)

    org_v1 = store_version(session, run_settings, organization.id, random_lora(config, tmp_path / "o", rank=4))
    registry.promote(session, run_settings, org_v1, actor="test", reason="org style")
    team_v1 = store_version(session, run_settings, team.id, random_lora(config, tmp_path / "t", rank=8))
    with pytest.raises(Conflict, match="the team has no champion adapter; name a version"):
        compose.plan(session, run_settings, team, method="cat", organization_weight=0.5, team_weight=0.5)
    with pytest.raises(Invalid, match="linear needs parents of one rank, and these have ranks 4 and 8"):
        compose.plan(
            session, run_settings, team, method="linear", organization_weight=0.5, team_weight=0.5, team_version=1
        )
    with pytest.raises(Invalid, match=r"team_weight must be in \(0, 2\]"):
        compose.plan(session, run_settings, team, method="cat", organization_weight=0.5, team_weight=0, team_version=1)
    planned = compose.plan(
        session, run_settings, team, method="cat", organization_weight=0.25, team_weight=1.0, team_version=1
    )
    assert planned == {
        "method": "cat",
        "parents": [
            {"role": "organization", "tenant_id": organization.id, "adapter_id": org_v1.id, "version": 1}
            | {"weight": 0.25, "scale": 1.0},
            {"role": "team", "tenant_id": team.id, "adapter_id": team_v1.id, "version": 1}
            | {"weight": 1.0, "scale": 1.0},
        ],
    }
    # a team without a champion of its own drafts with its organization's
    assert registry.drafting_adapter(session, team.id).id == org_v1.id
    assert registry.drafting_adapter(session, other.id) is None


def test_a_composition_is_a_run_evaluated_and_gated_like_training(worker_settings, tiny_model, tmp_path):
    """The organization's champion is a random adapter (it knows nothing of the team's mail); the
    team learns its own. Combined mostly of the team's, the candidate beats the inherited champion
    and is promoted; combined mostly of the organization's, it loses to the team's champion."""
    with session_scope() as session:
        organization = make_tenant(session)
        _, org_admin = make_key(session, organization, Role.admin)
        noise = random_lora(tiny_model.model.config, tmp_path / "org", rank=8, seed=7, std=0.5)
        org_v1 = store_version(session, worker_settings, organization.id, noise)
        registry.promote(session, worker_settings, org_v1, actor="test", reason="org style")
    team, team_admin = tenant_with_history()
    with session_scope() as session:
        service.set_organization(session, session.get(type(team), team.id), session.get(type(team), organization.id))

    trained = start(session_scope, team)  # gated against the organization's champion, which the team drafts with
    assert execute_run(trained, worker_settings, echo=lambda _: None) == RunStatus.promoted
    with session_scope() as session:
        run = session.get(TrainingRun, trained)
        assert run.report["versions"]["champion_inherited"] and run.report["versions"]["champion_id"] == org_v1.id
        team_v1 = registry.champion(session, team.id)
        registry.rollback(session, team.id, actor="test", reason="back to the organization's")
        assert registry.drafting_adapter(session, team.id).id == org_v1.id

    with TestClient(create_app()) as client:
        headers = {"X-API-Key": team_admin}
        email = {"sender": "Dana <d@example.com>", "subject": "Order", "body": "Where is order 5?"}
        drafted = client.post("/v1/drafts", json=email | {"max_new_tokens": 4}, headers=headers)
        assert drafted.status_code == 201 and drafted.json()["adapter_id"] == org_v1.id
        body = {"organization_weight": 0.1, "team_weight": 1.0, "team_version": team_v1.version}
        refused = client.post("/v1/adapters/combine", json=body | {"method": "svd"}, headers=headers)
        assert refused.status_code == 422
        not_a_team = client.post("/v1/adapters/combine", json={}, headers={"X-API-Key": org_admin})
        assert not_a_team.status_code == 422 and "belongs to no organization" in not_a_team.json()["detail"]
        queued = client.post("/v1/adapters/combine", json=body, headers=headers)
        assert queued.status_code == 202 and queued.json()["composition"]["method"] == "cat"
    combined_run = queued.json()["id"]
    assert execute_run(combined_run, worker_settings, echo=lambda _: None) == RunStatus.promoted
    with session_scope() as session:
        run = session.get(TrainingRun, combined_run)
        candidate = session.scalar(select(Adapter).where(Adapter.training_run_id == combined_run))
        assert candidate.status == AdapterStatus.champion and candidate.composition == run.composition
        assert [(p["adapter_id"], p["weight"]) for p in candidate.composition["parents"]] == [
            (org_v1.id, 0.1),
            (team_v1.id, 1.0),
        ]
        assert run.report["training"]["rank"] == 8 + 16 and run.report["decision"]["promote"]
        assert run.report["versions"]["champion_id"] == org_v1.id
        event = session.scalar(select(AdapterEvent).where(AdapterEvent.to_adapter_id == candidate.id))
        assert event.action == "promote" and event.actor == f"gate (run {combined_run})"

    cli = CliRunner().invoke(
        cli_app,
        ["adapters", "combine", "--tenant", team.slug, "--organization-weight", "2", "--team-weight", "0.1"]
        + ["--team-version", str(team_v1.version)],
    )
    assert cli.exit_code == 0, cli.output
    assert "combined 2 x organization v1 + 0.1 x team v1 (cat, rank 24" in cli.output
    exported = CliRunner().invoke(
        cli_app,
        ["adapters", "export", "--tenant", team.slug, "--version", str(candidate.version), "--format", "peft"]
        + ["--out", str(tmp_path / "export")],
    )
    assert exported.exit_code == 0, exported.output
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Combined from\n\n0.1 x organization" in card and "method cat." in card
    listed = CliRunner().invoke(cli_app, ["adapters", "list", "--tenant", team.slug])
    assert listed.exit_code == 0 and "combined: 0.1 x organization v1 + 1 x team v1 (cat)" in listed.output
    with session_scope() as session:
        last = session.scalars(select(TrainingRun).where(TrainingRun.tenant_id == team.id)).all()[-1]
        assert last.status == RunStatus.rejected and last.decision_reason.startswith("held-out NLL improved by -")
        assert registry.champion(session, team.id).id == candidate.id  # the gate kept the champion
