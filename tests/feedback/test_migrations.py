import time
from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, text

from core.db import Base
from migrations import alembic_config, is_at_head, upgrade


def test_migrations_match_the_models(engine):
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert is_at_head(engine)


def test_0003_stores_sessions_and_backfills_edit_counts_and_downgrades(empty_database_url):
    upgrade(empty_database_url, "0002")
    engine = create_engine(empty_database_url)
    now = datetime.now(UTC)
    pathological = ("a b " * 12_500)[:50_000]
    with engine.begin() as connection:
        tables = MetaData()
        tables.reflect(connection, only=["tenants", "drafts", "corrections"])
        connection.execute(
            tables.tables["tenants"].insert(),
            {"id": 1, "slug": "t", "name": "T", "instructions": "", "created_at": now},
        )
        draft = dict(tenant_id=1, sender="s", subject="", body="b", base_model="tiny", generation={}, created_at=now)
        draft |= dict(prompt_tokens=1, tokens_generated=1, finish_reason="stop", latency_ms=1.0)
        texts = {1: "a b c d", 2: "a b c d", 3: "a b c d", 4: "a " * 1000}
        connection.execute(tables.tables["drafts"].insert(), [draft | {"id": n, "draft_text": texts[n]} for n in texts])
        correction = dict(tenant_id=1, reason=None, reviewer="r", split="train", created_at=now)
        finals = {
            1: ("accepted", "a b c d"),
            2: ("edited", "a x c d e"),
            3: ("rejected", None),
            4: ("edited", pathological),
        }
        connection.execute(
            tables.tables["corrections"].insert(),
            [correction | {"id": n, "draft_id": n, "verdict": v, "final_text": f} for n, (v, f) in finals.items()],
        )

    started = time.perf_counter()
    upgrade(empty_database_url, "0003")
    assert time.perf_counter() - started < 10  # the pathological correction's count is bounded
    with engine.connect() as connection:
        counts = dict(connection.execute(text("SELECT id, edit_words FROM corrections")).all())
    assert counts == {1: 0, 2: 2, 3: None, 4: len(pathological.split()) - 1}  # 4: the bound (the 'a' kept)
    assert "web_sessions" in inspect(engine).get_table_names()

    command.downgrade(alembic_config(empty_database_url), "0002")
    assert "web_sessions" not in inspect(engine).get_table_names()
    assert "edit_words" not in {column["name"] for column in inspect(engine).get_columns("corrections")}
    engine.dispose()


def test_0007_allows_shadows_and_downgrades(empty_database_url):
    upgrade(empty_database_url, "0007")
    engine = create_engine(empty_database_url)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        tables = MetaData()
        tables.reflect(connection, only=["tenants", "adapters", "training_runs"])
        connection.execute(
            tables.tables["tenants"].insert(),
            {"id": 1, "slug": "t", "name": "T", "instructions": "", "shadow_corrections": 5, "created_at": now},
        )
        adapter = dict(tenant_id=1, path="p", content_hash="h", size_bytes=1, base_model="b", config={}, metrics={})
        adapter |= dict(base_model_fingerprint="f", created_at=now)
        connection.execute(tables.tables["adapters"].insert(), {"id": 1, "version": 1, "status": "shadow"} | adapter)
        run = dict(tenant_id=1, trigger="t", requested_by="r", config={}, step=0, total_steps=0, attempts=1)
        run |= dict(loss_history=[], created_at=now)
        connection.execute(tables.tables["training_runs"].insert(), {"id": 1, "status": "shadowed"} | run)
    assert "shadow_drafts" in inspect(engine).get_table_names()

    command.downgrade(alembic_config(empty_database_url), "0006")
    assert "shadow_drafts" not in inspect(engine).get_table_names()
    assert "shadow_corrections" not in {column["name"] for column in inspect(engine).get_columns("tenants")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM adapters")).scalar() == "rejected"
        assert connection.execute(text("SELECT status FROM training_runs")).scalar() == "rejected"
    engine.dispose()
