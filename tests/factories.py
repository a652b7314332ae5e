"""Small factory functions for test data."""

import uuid
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from feedback import service
from feedback.models import ApiKey, Correction, Draft, Role, Tenant, Verdict

# An incoming email as the draft routes take it
EMAIL = {"sender": "Dana <dana@example.com>", "subject": "[NW-10001] Brakes", "body": "My brake squeals."}


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
    session: Session,
    draft: Draft,
    key: ApiKey,
    verdict: Verdict,
    final_text: str | None = None,
    heldout_fraction: float = 0.2,
) -> Correction:
    correction, _ = service.submit_correction(
        session,
        draft=draft,
        correction=service.CorrectionInput(verdict, final_text),
        reviewer_key=key,
        idempotency_key=None,
        heldout_fraction=heldout_fraction,
    )
    return correction


def save_tiny_llama(tokenizer, folder: Path) -> Path:
    """A 2-layer random Llama over the tokenizer's vocabulary, saved with it as a local base-model
    folder: fast, deterministic, never ends its turn early."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_lora(model_config, folder: Path, *, rank: int = 4, targets=None, seed: int = 0, std: float = 0.2) -> Path:
    """A PEFT LoRA adapter for a model of this config, with random (non-zero) B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(model_config), LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained adapters have non-zero B; fresh ones would change nothing
            torch.nn.init.normal_(parameter, std=std)
    model.save_pretrained(folder)
    return folder


def store_version(session: Session, settings, tenant_id: int, trained_dir: Path, **fields):
    """A trained adapter folder stored as the tenant's next version (a candidate) of the base
    model `settings` names; `fields` override store_candidate's other arguments."""
    from agent.base_model import fingerprint, model_id, model_source
    from training import registry

    values = {
        "base_model": model_id(settings),
        "base_fingerprint": fingerprint(model_source(settings)),
        "config": {},
        "train_snapshot_id": None,
        "training_run_id": None,
    }
    return registry.store_candidate(
        session, settings, tenant_id=tenant_id, trained_dir=trained_dir, **(values | fields)
    )
