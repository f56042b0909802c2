"""The access log: every action of a user of the web application or API is a row."""

from __future__ import annotations

import logging

from sqlalchemy import Engine, Table
from sqlalchemy.exc import SQLAlchemyError

from db.tables import AccessEvent, utcnow

log = logging.getLogger(__name__)
_access: Table = AccessEvent.__table__  # type: ignore[assignment]


def record(engine: Engine, action: str, username: str, client: str, *,
           outcome: str = "ok", study_uid: str | None = None,
           patient_id: str | None = None, detail: str = "") -> None:
    """Add one row: who (``username``), from where (``client``), what (``action``,
    ``outcome``, ``detail``), which study and patient."""
    try:
        with engine.begin() as conn:
            conn.execute(_access.insert().values(
                at=utcnow(), username=username[:64], client=client[:255], action=action,
                outcome=outcome, study_instance_uid=study_uid, patient_id=patient_id,
                detail=detail))
    except SQLAlchemyError:
        # The page is still served; the failure is in the log for the administrator.
        log.exception("could not record %s by %s in the access log", action, username)
