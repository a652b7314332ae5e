from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from core.db import Base
from migrations import is_at_head


def test_migrations_match_the_models(engine):
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert is_at_head(engine)
