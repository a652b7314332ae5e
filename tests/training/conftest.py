import os
import shutil
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.prompt import pad_token_id
from core.settings import get_settings
from feedback.samples import load_emails
from tests.db import committing_sessions
from tests.factories import make_tenant
from tests.training.helpers import add_corrections
from training.regression_set import REGRESSION_SET


@pytest.fixture(params=["postgres", "sqlite"])
def sessions(request):
    """A unit-of-work factory on each real database in turn, as the worker uses: each block commits."""
    return committing_sessions(request.getfixturevalue(f"{request.param}_engine"))


@pytest.fixture
def tenant_with_corrections(sessions):
    with sessions() as session:
        tenant = make_tenant(session, instructions="Answer as Marta.")
        add_corrections(session, tenant, 40)
    return tenant


@pytest.fixture
def run_settings(tiny_settings, tmp_path):
    """The tiny model's settings with a registry and reports of this test's own."""
    return tiny_settings.model_copy(update={"var_dir": tmp_path, "adapter_dir": tmp_path / "adapters"})


@pytest.fixture
def worker_settings(tiny_settings, tmp_path, monkeypatch, postgres_engine):
    """Process settings for the worker and the app: the tiny base, this test's registry, the
    PostgreSQL test database and the test Redis database (emptied)."""
    monkeypatch.setenv("DRAFTLOOP_BASE_MODEL", tiny_settings.base_model)
    monkeypatch.setenv("DRAFTLOOP_MODEL_DTYPE", "float32")
    monkeypatch.setenv("DRAFTLOOP_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("DRAFTLOOP_ADAPTER_DIR", str(tmp_path / "adapters"))
    monkeypatch.setenv("DRAFTLOOP_GATE_MIN_HELDOUT", "3")
    monkeypatch.setenv("DRAFTLOOP_EVAL_DRAFT_EXAMPLES", "2")
    monkeypatch.setenv("DRAFTLOOP_EVAL_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("DRAFTLOOP_MIN_NEW_CORRECTIONS", "20")
    redis.Redis.from_url(os.environ["DRAFTLOOP_REDIS_URL"]).flushdb()
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def general_tiny_base(tiny_base_dir, tmp_path_factory) -> Path:
    """The tiny model after a few full steps on general writing (the regression set's replies, their
    first 64 tokens), as a local base-model folder: a base with general writing to forget. The
    random tiny model has none; its NLL is near uniform on any text, so no adapter can raise it."""
    folder = tmp_path_factory.mktemp("general-tiny-base")
    shutil.copytree(tiny_base_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    replies = [tokenizer(email.reply).input_ids[:64] for email in load_emails(REGRESSION_SET)]
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(12):
        batch = [replies[(step * 8 + i) % len(replies)] for i in range(8)]
        ids = torch.full((8, 64), pad_token_id(tokenizer))
        labels = torch.full((8, 64), -100)
        for i, reply in enumerate(batch):
            ids[i, : len(reply)] = labels[i, : len(reply)] = torch.tensor(reply)
        model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder
