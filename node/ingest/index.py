"""Index received instances in the database: patient, study, series, instance rows.

Written with SQLAlchemy Core rather than the ORM because it runs once per received
instance on the ingest path; one short transaction per instance, committed before the
SCP answers Success.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from db.batches import batches
from db.tables import (
    AssociationRecord,
    Instance,
    Patient,
    Series,
    Study,
    StudyEvent,
    StudyStatus,
)
from node.dicom.status import StoreStatus
from node.ingest.header import HeaderError, InstanceHeader

_patients: Table = Patient.__table__  # type: ignore[assignment]
_studies: Table = Study.__table__  # type: ignore[assignment]
_series: Table = Series.__table__  # type: ignore[assignment]
_instances: Table = Instance.__table__  # type: ignore[assignment]
_associations: Table = AssociationRecord.__table__  # type: ignore[assignment]
_events: Table = StudyEvent.__table__  # type: ignore[assignment]


# Statements on the per-instance path are built once: constructing SQLAlchemy
# expressions per call cost more than the commit itself.
_FIND_INSTANCE = select(_instances.c.file_path).where(
    _instances.c.sop_instance_uid == bindparam("sop")
)
_INSERT_INSTANCE = _instances.insert()
_TOUCH_STUDY = (
    update(_studies)
    .where(_studies.c.id == bindparam("study"))
    .where(_studies.c.status == StudyStatus.RECEIVING.value)
    .values(last_received_at=bindparam("now"))
)
_COUNT_STORED = (
    update(_associations)
    .where(_associations.c.id == bindparam("association"))
    .values(instances_stored=_associations.c.instances_stored + 1)
)


class IdentityConflict(HeaderError):
    """The instance contradicts the index (a series in two studies, a study of two
    patients); nothing is recorded. The reason names UIDs only, never patient data."""

    def __init__(self, reason: str) -> None:
        super().__init__(StoreStatus.IDENTITY_CONFLICT, reason)


def clip(value: str, column: Any) -> str:
    """Fit a free-text value into its column: real data overruns VR lengths, and
    PostgreSQL (unlike SQLite) refuses an overlong string."""
    length = getattr(column.type, "length", None)
    return value[:length] if length else value


class InstanceIndex:
    """Records instances; keeps a per-process cache of row ids already committed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def knows_series(self, series_instance_uid: str) -> bool:
        """True when this process has committed the series' row (and its study's)."""
        return self._cached("series", series_instance_uid) is not None

    def find(self, sop_instance_uid: str) -> str | None:
        """The stored file path of an indexed instance, or ``None``."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return conn.execute(_FIND_INSTANCE, {"sop": sop_instance_uid}).scalar_one_or_none()

    def record(
        self,
        header: InstanceHeader,
        file_path: str,
        file_size: int,
        transfer_syntax: str,
        association_id: int | None,
        now: datetime,
    ) -> bool:
        """Commit the instance's rows; ``False`` if it was already indexed (duplicate)."""
        new_ids: dict[tuple[str, str], int] = {}
        try:
            with self.engine.begin() as conn:
                if conn.execute(
                    _FIND_INSTANCE, {"sop": header.sop_instance_uid}
                ).first() is not None:
                    return False
                patient_id = self._patient(conn, header, new_ids)
                study_id = self._study(conn, header, patient_id, now, new_ids)
                series_id = self._series(conn, header, study_id, now, new_ids)
                conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "sop_instance_uid": header.sop_instance_uid,
                        "sop_class_uid": header.sop_class_uid,
                        "series_fk": series_id,
                        "instance_number": header.instance_number,
                        "transfer_syntax_uid": transfer_syntax,
                        "file_path": file_path,
                        "file_size": file_size,
                        "received_at": now,
                        "association_fk": association_id,
                    },
                )
                if association_id is not None:
                    conn.execute(_COUNT_STORED, {"association": association_id})
        except IntegrityError:
            # Another association committed the same SOP Instance UID first.
            if self.find(header.sop_instance_uid) is not None:
                return False
            raise
        # Only ids of committed rows may be reused by later transactions.
        with self._lock:
            self._ids.update(new_ids)
        return True

    def touch_study(self, study_instance_uid: str, now: datetime) -> None:
        """An instance of the study has just been completed: restart its quiet period,
        reopening it if it became stable while that instance was still arriving."""
        with self.engine.begin() as conn:
            study_id = conn.execute(
                select(_studies.c.id).where(_studies.c.study_instance_uid == study_instance_uid)
            ).scalar_one()
            if not conn.execute(_TOUCH_STUDY, {"study": study_id, "now": now}).rowcount:
                self._reopen(conn, study_id, now)

    def set_size(self, sop_instance_uid: str, file_size: int) -> None:
        """Correct the size of a row recorded before its dataset had fully arrived."""
        with self.engine.begin() as conn:
            conn.execute(
                update(_instances)
                .where(_instances.c.sop_instance_uid == sop_instance_uid)
                .values(file_size=file_size)
            )

    def forget(self, sop_instance_uid: str, association_id: int | None) -> None:
        """Remove an instance row committed for a file that could not be made safe."""
        with self.engine.begin() as conn:
            deleted = conn.execute(
                delete(_instances).where(_instances.c.sop_instance_uid == sop_instance_uid)
            ).rowcount
            if deleted and association_id is not None:
                conn.execute(
                    update(_associations)
                    .where(_associations.c.id == association_id)
                    .values(instances_stored=_associations.c.instances_stored - 1)
                )

    def drop_unfiled(self, association_ids: list[int], exists: Callable[[str], bool]) -> list[str]:
        """Remove rows of these (interrupted) associations whose file is missing.

        A node killed between committing an instance's row and linking its file never
        acknowledged that instance; its row must not claim the node holds it.
        """
        if not association_ids:
            return []
        missing: list[tuple[int, str]] = []
        with self.engine.begin() as conn:
            for batch in batches(association_ids):
                rows = conn.execute(
                    select(_instances.c.id, _instances.c.sop_instance_uid,
                           _instances.c.file_path)
                    .where(_instances.c.association_fk.in_(batch))
                ).all()
                missing += [(row_id, uid) for row_id, uid, path in rows if not exists(path)]
            for ids in batches([row_id for row_id, _ in missing]):
                conn.execute(delete(_instances).where(_instances.c.id.in_(ids)))
        return [uid for _, uid in missing]

    def _cached(self, kind: str, key: str) -> int | None:
        return self._ids.get((kind, key))

    def _patient(
        self, conn: Connection, header: InstanceHeader, new_ids: dict[tuple[str, str], int]
    ) -> int:
        key = f"{header.patient_id}\\{header.issuer_of_patient_id}"
        cached = self._cached("patient", key)
        if cached is not None:
            return cached
        where = (_patients.c.patient_id == clip(header.patient_id, _patients.c.patient_id)) & (
            _patients.c.issuer == clip(header.issuer_of_patient_id, _patients.c.issuer)
        )
        row_id = _get_or_insert(
            conn,
            _patients,
            where,
            {
                "patient_id": clip(header.patient_id, _patients.c.patient_id),
                "issuer": clip(header.issuer_of_patient_id, _patients.c.issuer),
                "patient_name": clip(header.patient_name, _patients.c.patient_name),
                "birth_date": clip(header.patient_birth_date, _patients.c.birth_date),
                "sex": clip(header.patient_sex, _patients.c.sex),
            },
        )
        new_ids[("patient", key)] = row_id
        return row_id

    def _study(
        self,
        conn: Connection,
        header: InstanceHeader,
        patient_id: int,
        now: datetime,
        new_ids: dict[tuple[str, str], int],
    ) -> int:
        uid = header.study_instance_uid
        study_id = self._cached("study", uid)
        if study_id is not None and self._cached("study-patient", uid) != patient_id:
            raise IdentityConflict("PatientID/IssuerOfPatientID differ from the earlier "
                                   "instances of this study")
        if study_id is None:
            study_id = _get_or_insert(
                conn,
                _studies,
                _studies.c.study_instance_uid == uid,
                {
                    "study_instance_uid": uid,
                    "patient_fk": patient_id,
                    "study_date": clip(header.study_date, _studies.c.study_date),
                    "study_time": clip(header.study_time, _studies.c.study_time),
                    "accession_number": clip(header.accession_number, _studies.c.accession_number),
                    "study_description": clip(
                        header.study_description, _studies.c.study_description
                    ),
                    "status": StudyStatus.RECEIVING.value,
                    "received_at": now,
                    "last_received_at": now,
                },
                on_insert=lambda new_id: conn.execute(
                    _events.insert().values(
                        study_fk=new_id,
                        from_status=None,
                        to_status=StudyStatus.RECEIVING.value,
                        at=now,
                        reason="first instance received",
                    )
                ),
            )
            owner = conn.execute(select(_studies.c.patient_fk)
                                 .where(_studies.c.id == study_id)).scalar_one()
            if owner != patient_id:
                raise IdentityConflict("PatientID/IssuerOfPatientID differ from the earlier "
                                       "instances of this study")
            new_ids[("study", uid)] = study_id
            new_ids[("study-patient", uid)] = patient_id
        touched = conn.execute(_TOUCH_STUDY, {"study": study_id, "now": now}).rowcount
        if not touched:
            self._reopen(conn, study_id, now)
        return study_id

    @staticmethod
    def _reopen(conn: Connection, study_id: int, now: datetime) -> None:
        """An instance arrived for a study that had left ``receiving``: reopen it."""
        previous = conn.execute(
            select(_studies.c.status).where(_studies.c.id == study_id)
        ).scalar_one()
        conn.execute(
            update(_studies)
            .where(_studies.c.id == study_id)
            .values(status=StudyStatus.RECEIVING.value, last_received_at=now, stable_at=None)
        )
        conn.execute(
            _events.insert().values(
                study_fk=study_id,
                from_status=previous,
                to_status=StudyStatus.RECEIVING.value,
                at=now,
                reason="instance received after the study had left 'receiving'",
            )
        )

    def _series(
        self,
        conn: Connection,
        header: InstanceHeader,
        study_id: int,
        now: datetime,
        new_ids: dict[tuple[str, str], int],
    ) -> int:
        uid = header.series_instance_uid
        cached = self._cached("series", uid)
        if cached is not None and self._cached("series-study", uid) == study_id:
            return cached
        if cached is not None:
            raise _series_elsewhere(uid)
        row_id = _get_or_insert(
            conn,
            _series,
            _series.c.series_instance_uid == uid,
            {
                "series_instance_uid": uid,
                "study_fk": study_id,
                "modality": clip(header.modality, _series.c.modality),
                "series_number": header.series_number,
                "series_description": clip(
                    header.series_description, _series.c.series_description
                ),
                "body_part_examined": clip(
                    header.body_part_examined, _series.c.body_part_examined
                ),
                "received_at": now,
            },
        )
        if conn.execute(select(_series.c.study_fk)
                        .where(_series.c.id == row_id)).scalar_one() != study_id:
            raise _series_elsewhere(uid)
        new_ids[("series", uid)] = row_id
        new_ids[("series-study", uid)] = study_id
        return row_id


def _series_elsewhere(series_uid: str) -> IdentityConflict:
    return IdentityConflict(f"SeriesInstanceUID already in another study: {series_uid}")


def _get_or_insert(
    conn: Connection,
    table: Table,
    where: Any,
    values: dict[str, Any],
    on_insert: Any = None,
) -> int:
    """Return the id of the row matching ``where``, inserting ``values`` if absent.

    Concurrent writers may race to insert the same row: ``ON CONFLICT DO NOTHING``
    makes the loser read the winner's row instead of failing.
    """
    found = conn.execute(select(table.c.id).where(where)).scalar_one_or_none()
    if found is not None:
        return int(found)
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - other databases are not supported yet
        stmt = table.insert().values(**values)
    result = conn.execute(stmt.returning(table.c.id))
    inserted = result.scalar_one_or_none()
    if inserted is not None:
        if on_insert is not None:
            on_insert(inserted)
        return int(inserted)
    return int(conn.execute(select(table.c.id).where(where)).scalar_one())

