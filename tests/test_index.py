"""The index's clean-up paths: rows of instances whose file never made it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from db.migrate import upgrade
from db.session import make_engine
from db.tables import utcnow
from node import leases
from node.ingest.associations import AssociationLog
from node.ingest.header import InstanceHeader
from node.ingest.index import InstanceIndex
from node.ingest.storage import InstanceStore


def _header(sop: str) -> InstanceHeader:
    return InstanceHeader(
        "1.2.840.10008.5.1.4.1.1.2", sop, "1.2.3", "1.2.3.1", "P1", "", "Doe^J", "", "",
        "", "", "", "", "CT", 1, "", "", 1,
    )


def test_forget_and_drop_unfiled(tmp_path: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    lease = leases.register(engine, 30, "test")
    audit, index = AssociationLog(engine, lease), InstanceIndex(engine)
    store = InstanceStore(tmp_path / "data")
    association = audit.open("SCU", "PACSNODE", "127.0.0.1", 1234)
    filed = store.relative_path("1.2.3", "1.2.3.1", "1.2.3.1.1")
    store.publish(store.stage([b"x" * 10]), filed)
    index.record(_header("1.2.3.1.1"), filed.as_posix(), 10, "1.2.840.10008.1.2", association, utcnow())
    index.record(_header("1.2.3.1.2"), "studies/1.2.3/1.2.3.1/1.2.3.1.2.dcm", 10,
                 "1.2.840.10008.1.2", association, utcnow())
    index.record(_header("1.2.3.1.3"), "studies/1.2.3/1.2.3.1/1.2.3.1.3.dcm", 10,
                 "1.2.840.10008.1.2", association, utcnow())

    index.forget("1.2.3.1.3", association)
    assert index.find("1.2.3.1.3") is None

    # Only rows of the given associations, and only those without a file, go.
    assert index.drop_unfiled([association + 1], store.exists) == []
    assert index.drop_unfiled([association], store.exists) == ["1.2.3.1.2"]
    assert index.find("1.2.3.1.2") is None
    assert index.find("1.2.3.1.1") == filed.as_posix()
    with engine.connect() as conn:
        stored = conn.execute(text("select instances_stored from associations")).scalar_one()
    assert stored == 2  # three recorded, one taken back by forget
    engine.dispose()
