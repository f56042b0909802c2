"""The Alembic migrations build exactly the schema the SQLAlchemy models describe.

The node creates and upgrades its database only through the migrations, but queries it
through ``db.tables``: a column, index, constraint or type that one has and the other
lacks is a schema that only exists on developers' machines.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.migrate import current_revision, head_revision, upgrade
from db.session import make_engine
from db.tables import Base


def test_migrations_match_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert upgrade(engine) == (None, head_revision())  # from an empty database
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            # Types and server defaults too (Alembic compares types by default, not
            # server defaults).
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            differences: list[Any] = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == [], "\n".join(map(repr, differences))
