"""Shared fixtures: real PostgreSQL and SQLite databases with the migrations applied, one
transaction per test rolled back at the end."""

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from core.db import make_engine
from migrations import upgrade

POSTGRES_SERVER = os.environ.get("DRAFTLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
POSTGRES_URL = f"{POSTGRES_SERVER}/draftloop_test"
# The app under test (readiness, get_engine) talks to the same test database; settings are
# read on first use, after this line.
os.environ["DRAFTLOOP_DATABASE_URL"] = POSTGRES_URL


def _fresh_postgres() -> str:
    admin = create_engine(f"{POSTGRES_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS draftloop_test WITH (FORCE)"))
        connection.execute(text("CREATE DATABASE draftloop_test"))
    admin.dispose()
    return POSTGRES_URL


@pytest.fixture(scope="session")
def postgres_engine() -> Iterator[Engine]:
    upgrade(_fresh_postgres())
    engine = make_engine(POSTGRES_URL)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'draftloop.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")


def _rolled_back_session(engine: Engine) -> Iterator[Session]:
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()


@pytest.fixture
def session(engine) -> Iterator[Session]:
    """A session on each database in turn; whatever a test writes is rolled back."""
    yield from _rolled_back_session(engine)


@pytest.fixture
def pg_session(postgres_engine) -> Iterator[Session]:
    yield from _rolled_back_session(postgres_engine)


@pytest.fixture(scope="session")
def tiny_drafter():
    """A randomly initialised two-layer Llama with the real tokenizer: fast, and a real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from agent.drafting import Drafter
    from agent.model import LoadedModel, load_tokenizer
    from core.settings import Settings

    settings = Settings()
    tokenizer = load_tokenizer(settings)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Drafter(LoadedModel(LlamaForCausalLM(config).eval(), tokenizer, "tiny-llama"), settings)
