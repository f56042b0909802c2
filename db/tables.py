"""The node's records: who sent what, and where it is.

Patients, studies, series and instances mirror the DICOM information model; an
association row records each DICOM conversation for audit; study events record
every change of a study's state with its time. Timestamps are UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    column,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite has no time zones; without this, values read back naive and compare wrongly
    with aware ones.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC values")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class StudyStatus(str, enum.Enum):
    """Where a study is in its life at the node.

    ``receiving``: instances are arriving. ``stable``: none arrived for
    ``study.stable_age_s``; the study is considered complete and its series are routed.
    ``processing``: jobs for its series are queued or running. ``analyzed``
    (:attr:`JOBS_ENDED`): every job ended, done, skipped or failed; each job row says
    which, and the study event sums them up, so a study none of whose series could be
    analysed is ``analyzed`` too. An instance arriving in any state after
    ``receiving`` reopens the study.
    """

    RECEIVING = "receiving"
    STABLE = "stable"
    PROCESSING = "processing"  # jobs for its series are queued or running
    # Named for what it means; the stored value stays "analyzed", which the CLI, its
    # JSON and existing databases carry.
    JOBS_ENDED = "analyzed"


class AssociationOutcome(str, enum.Enum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
    CLOSED = "closed"  # the connection ended without release or abort
    INTERRUPTED = "interrupted"  # the node process died during it (found at next start)


class NodeProcess(Base):
    """One start of a pacsnode process: its identity for leases, and where it ran.

    Work is owned by ``id`` (a UUID per start), never by host name or PID: in a
    container every start is PID 1 on the same host name, and a rescheduled pod gets a
    new host name. ``host`` and ``pid`` are for people reading the audit.
    """

    __tablename__ = "node_processes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AssociationRecord(Base):
    """One DICOM association accepted (or rejected) by the node."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(16), default=AssociationOutcome.OPEN.value)
    #: The process serving it (:class:`NodeProcess` id) while it is open, and until
    #: when that process's lease on it holds (renewed by its heartbeat); an open row whose
    #: lease expired belongs to a dead process and is closed ``interrupted``.
    owner: Mapped[str | None] = mapped_column(String(36))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Why the node refused it (``rejected``); NULL for the others and for rows older
    #: than the column.
    reason: Mapped[str | None] = mapped_column(String(255))
    #: Whether it came over DICOM TLS, and the subject of the client certificate it
    #: showed (NULL: none, or a row older than the columns).
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    peer_certificate: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (Index("ix_associations_started", "started_at"),
                      Index("ix_associations_calling", "calling_ae"),
                      Index("ix_associations_outcome", "outcome"))


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer", name="uq_patient"),
        Index("ix_patients_name", "patient_name"),
        # The search's lower(patient_name) LIKE 'prefix%' (migration 0011; PostgreSQL).
        Index("ix_patients_name_lower", func.lower(column("patient_name")).label("lower_name"),
              postgresql_ops={"lower_name": "text_pattern_ops"}).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Empty string, not NULL, for an absent ID: NULLs never collide in a unique key.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(32), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(32), default=StudyStatus.RECEIVING.value)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", order_by="StudyEvent.id"
    )

    # The status index serves the stability monitor; the others the web search
    # (newest first, by study date, by accession number) on large catalogues.
    __table_args__ = (Index("ix_studies_status_last", "status", "last_received_at"),
                      Index("ix_studies_received", "received_at", "id"),
                      Index("ix_studies_study_date", "study_date"),
                      Index("ix_studies_accession", "accession_number"))


class StudyEvent(Base):
    """A change of a study's state, kept for audit."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")

    study: Mapped[Study] = relationship(back_populates="events")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text, doc="relative to storage.data_dir")
    file_size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    association_fk: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (Index("ix_instances_received", "received_at"),
                      # Also what the studies search by calling AE reads, alone.
                      Index("ix_instances_association_series", "association_fk",
                            "series_fk"))


class JobStatus(str, enum.Enum):
    """The life of one series' analysis."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # no route matched, or never an image to analyse; see reason


class Job(Base):
    """The node's decision about one series at one stable point, and its processing.

    A study that becomes stable again after late instances gets new jobs; old rows
    stay for audit.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    route: Mapped[str | None] = mapped_column(String(64))
    pipeline: Mapped[str | None] = mapped_column(String(64))
    destinations: Mapped[str] = mapped_column(Text, default="[]", doc="JSON list of names")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    reason: Mapped[str] = mapped_column(Text, default="", doc="why skipped, or the error")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    timings: Mapped[str] = mapped_column(Text, default="{}", doc="JSON: step -> seconds")
    #: The process working on it (running/sending) and until when its lease holds.
    owner: Mapped[str | None] = mapped_column(String(36))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: ``jobs.executor: celery``: when its task was last sent to the broker (NULL: not
    #: yet, or queued again after an interrupted run).
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_jobs_status", "status", "id"),
                      Index("ix_jobs_finished_status", "finished_at", "status"))


class Result(Base):
    """A DICOM object the node produced (SEG, SR) or a file beside it (preview)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), doc="seg, sr or preview")
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    file_path: Mapped[str] = mapped_column(Text, doc="relative to storage.data_dir")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeliveryStatus(str, enum.Enum):
    """The life of one result on its way to one destination (the outbox).

    ``pending`` waits for its next attempt (``next_attempt_at``); ``sending`` is held by
    one process (``owner`` until ``lease_until``) while it sends; then ``sent`` (the
    destination answered Success to the C-STORE), or, for a destination with
    ``storage_commitment``, ``awaiting_commitment`` until the PACS reports the instance
    safe (``committed``) or not (``pending`` again, re-sent). ``failed``: not delivered
    within ``delivery.max_age_h``; needs an operator (``pacsnode resend``).
    """

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    AWAITING_COMMITMENT = "awaiting_commitment"
    COMMITTED = "committed"
    FAILED = "failed"


class Delivery(Base):
    """One result on its way to one destination: a durable message until the
    destination confirms it."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: When it (last) entered the outbox: created, or put back by ``pacsnode resend``;
    #: it is ``failed`` once ``delivery.max_age_h`` has passed since without success.
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: pending: the next send; awaiting_commitment: the next Storage Commitment request
    #: (now, or when the last one has gone unanswered for delivery.commitment_timeout_s).
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The Transaction UID of the Storage Commitment request waiting for its report, and
    #: how many requests were made (each unanswered one is asked again).
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commitment_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: The process working on it (running/sending) and until when its lease holds.
    owner: Mapped[str | None] = mapped_column(String(36))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_deliveries_due", "status", "next_attempt_at"),
        Index("ix_deliveries_destination_due", "destination", "status", "next_attempt_at"),
        # The claim's order (a SEG before its SR) within a destination's pending ones.
        Index("ix_deliveries_destination_result", "destination", "status", "result_fk", "id"),
        Index("ix_deliveries_sent_status", "sent_at", "status"),
    )


class DeliveryEvent(Base):
    """A change of a delivery (a status, an attempt, a Storage Commitment request),
    with its reason, kept for audit."""

    __tablename__ = "delivery_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_fk: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")


class CircuitState(str, enum.Enum):
    """A destination's circuit breaker: ``closed`` sends everything due; ``open`` (after
    ``delivery.breaker_failures`` failed rounds in a row) sends one probe per interval;
    ``half-open`` while that probe is under way."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class DestinationState(Base):
    """The circuit breaker of one destination, shared by every process of the node."""

    __tablename__ = "destination_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=CircuitState.CLOSED.value)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class User(Base):
    """A person who may use the web application, with one role.

    ``admin`` may do everything, ``auditor`` reads everything including the access log
    and downloads results, ``viewer`` reads studies and results only.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: argon2id (argon2-cffi's encoded form, parameters included).
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Consecutive failed logins, and until when the account is locked because of them.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A Bearer token of a user (``pacsnode token create``); only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebSession(Base):
    """A logged-in browser: the SHA-256 of its cookie, its CSRF token, its lifetime."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AccessEvent(Base):
    """One action of a user of the web application or API, for the access log: who,
    when, from where, what, and which patient and study it touched."""

    __tablename__ = "access_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    #: The user's name as it was then (kept when the user is removed); '' if unknown.
    username: Mapped[str] = mapped_column(String(64), default="", index=True)
    client: Mapped[str] = mapped_column(String(255), default="")
    #: login, login_failed, logout, view_study, search, download, resend, rerun,
    #: user_add, user_remove, user_passwd, token_create, denied.
    action: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
