"""Composed adapters: an organization's adapter and one of its team's combined into a new,
immutable version of the team, with PEFT's weighted combination (add_weighted_adapter). A
composition is a run like a training run (training/pipeline.py): its candidate is recorded with
its parents and weights, then evaluated on the team's held-out set and gated like any other.

Each parent enters at the scale it is served at, so the combination is of what each tenant
drafts with. Two methods:
- cat: the parents' ranks side by side (rank r1 + r2): exactly the weighted sum of their updates;
- linear: A and B each a weighted sum (equal ranks only, rank r): smaller, but only an
  approximation (the cross terms of the product stay in)."""

from dataclasses import replace
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from agent.adapters import AdapterRef, attach
from core.errors import Conflict, Invalid
from core.settings import Settings
from feedback.models import Tenant
from training import registry
from training.models import Adapter

Method = Literal["cat", "linear"]
COMBINED = "combined"  # the combined adapter's name inside the PeftModel
MAX_WEIGHT = 2.0


def plan(
    session: Session,
    settings: Settings,
    team: Tenant,
    *,
    method: Method,
    organization_weight: float,
    team_weight: float,
    organization_version: int | None = None,
    team_version: int | None = None,
) -> dict:
    """The composition a run will carry out (stored on the run), checked now so that a bad one is
    refused before it is queued. A version left out is that tenant's champion."""
    if team.organization_id is None:
        raise Invalid(f"{team.slug} belongs to no organization; make it a team first (draftloop tenants organization)")
    for name, weight in (("organization_weight", organization_weight), ("team_weight", team_weight)):
        if not 0 < weight <= MAX_WEIGHT:
            raise Invalid(f"{name} must be in (0, {MAX_WEIGHT:g}], not {weight}")
    parents = [
        (_parent(session, team.organization_id, organization_version, "organization"), organization_weight),
        (_parent(session, team.id, team_version, "team"), team_weight),
    ]
    ranks = [registry.rank_of(settings.adapter_dir.resolve() / adapter.path) for adapter, _ in parents]
    if method == "linear" and len(set(ranks)) > 1:
        raise Invalid(f"linear needs parents of one rank, and these have ranks {ranks[0]} and {ranks[1]}: use cat")
    if method == "cat" and sum(ranks) > registry.MAX_RANK:
        raise Invalid(f"cat would make a rank-{sum(ranks)} adapter; the limit is {registry.MAX_RANK}")
    return {
        "method": method,
        "parents": [
            {
                "role": role,
                "tenant_id": adapter.tenant_id,
                "adapter_id": adapter.id,
                "version": adapter.version,
                "weight": weight,
                "scale": registry.served_scale(session, adapter),
            }
            for role, (adapter, weight) in zip(("organization", "team"), parents, strict=True)
        ],
    }


def describe(composition: dict) -> str:
    """The parents and their weights, as the CLI and the run's progress show them."""
    return " + ".join(f"{p['weight']:g} x {p['role']} v{p['version']}" for p in composition["parents"])


def _parent(session: Session, tenant_id: int, version: int | None, role: str) -> Adapter:
    if version is not None:
        return registry.get_adapter(session, tenant_id, version=version)
    if (current := registry.champion(session, tenant_id)) is None:
        raise Conflict(f"the {role} has no champion adapter; name a version of it to combine")
    return current


def combine(base_source: str, parents: list[tuple[AdapterRef, float]], method: Method, out_dir: Path) -> Path:
    """Combine the parents (each at its AdapterRef's scale, times its weight) on the base model at
    base_source with PEFT, and save the combined adapter alone in out_dir; returns its folder.

    The combined adapter is saved with lora_alpha = r and without rsLoRA, so its scaling is 1:
    the parents' scalings are inside its weights already (PEFT would keep the first parent's
    use_rslora, which would scale the sum by sqrt(r) once more)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_source, dtype=torch.float32, local_files_only=True)
    for ref, _ in parents:
        model = attach(model, ref)
    names = [f"adapter-{ref.id}" for ref, _ in parents]
    model.add_weighted_adapter(names, [weight for _, weight in parents], COMBINED, combination_type=method)
    model.peft_config[COMBINED].use_rslora = False
    for module in model.modules():
        if isinstance(module, LoraLayer) and COMBINED in module.scaling:
            module.use_rslora[COMBINED] = False
            module.set_scale(COMBINED, 1.0)
    model.save_pretrained(out_dir, selected_adapters=[COMBINED])
    return out_dir / COMBINED


def parent_refs(session: Session, settings: Settings, composition: dict, base_fingerprint: str) -> list:
    """The composition's parents as (AdapterRef, weight), verified (registry.serving_ref), each at
    the scale it was served at when the composition was planned."""
    return [
        (
            replace(
                registry.serving_ref(session, settings, session.get(Adapter, p["adapter_id"]), base_fingerprint),
                scale=p["scale"],
            ),
            p["weight"],
        )
        for p in composition["parents"]
    ]
