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
