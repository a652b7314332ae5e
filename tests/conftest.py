"""Shared fixtures: real PostgreSQL and SQLite databases with the migrations applied (one
transaction per test, rolled back at the end), the real embedded model and a tiny model."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from agent.base_model import LoadedModel, load_base_model, load_tokenizer
from agent.drafting import Drafter
from core.db import make_engine
from core.settings import Settings
from migrations import upgrade
from tests.db import POSTGRES_SERVER
from tests.factories import save_tiny_llama
from tests.live import MODEL_CACHE_DIR

# DRAFTLOOP_TEST_DATABASE lets two checkouts on one machine keep their own test databases.
TEST_DATABASE = os.environ.get("DRAFTLOOP_TEST_DATABASE", "draftloop_test")
POSTGRES_URL = f"{POSTGRES_SERVER}/{TEST_DATABASE}"
# The app under test (readiness, get_engine) talks to the same test database; settings are
# read on first use, after this line.
os.environ["DRAFTLOOP_DATABASE_URL"] = POSTGRES_URL
# Tests use their own Redis database, emptied at the start of each Celery test.
os.environ.setdefault("DRAFTLOOP_REDIS_URL", "redis://127.0.0.1:6379/15")


def _fresh_postgres(database: str = TEST_DATABASE) -> str:
    admin = create_engine(f"{POSTGRES_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        connection.execute(text(f"CREATE DATABASE {database}"))
    admin.dispose()
    return f"{POSTGRES_SERVER}/{database}"


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


@pytest.fixture(params=["postgres", "sqlite"])
def empty_database_url(request, tmp_path) -> str:
    """A database without tables, on each backend in turn, for migrating up and down."""
    if request.param == "postgres":
        return _fresh_postgres(f"{TEST_DATABASE}_empty")
    return f"sqlite:///{tmp_path / 'empty.db'}"


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
def model_settings(tmp_path_factory) -> Settings:
    return Settings(var_dir=tmp_path_factory.mktemp("var"), model_cache_dir=MODEL_CACHE_DIR, model_dtype="float32")


@pytest.fixture(scope="session")
def embedded_model(model_settings) -> LoadedModel:
    return load_base_model(model_settings)


@pytest.fixture(scope="session")
def tokenizer(embedded_model, model_settings):
    return load_tokenizer(model_settings)


@pytest.fixture(scope="session")
def tiny_base_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny random Llama over the real vocabulary (tests/factories.py), as a local base-model folder."""
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_settings(tiny_base_dir, tmp_path_factory) -> Settings:
    """Settings for running the training pipeline on the tiny model."""
    var_dir = tmp_path_factory.mktemp("tiny-var")
    return Settings(
        base_model=str(tiny_base_dir),
        model_dtype="float32",
        var_dir=var_dir,
        adapter_dir=var_dir / "adapters",
        gate_min_heldout=3,
        eval_draft_examples=2,
        eval_max_new_tokens=8,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_settings) -> LoadedModel:
    return load_base_model(tiny_settings)


@pytest.fixture(scope="session")
def tiny_drafter(tiny_model, model_settings) -> Drafter:
    return Drafter.local(tiny_model, model_settings)
