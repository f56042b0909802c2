"""The broker is only a nudge: what the enqueuer sends, and what a worker's claim does
with a duplicate, a lost message or a job whose series is busy (on the database alone;
tests/test_celery.py runs the whole thing over real brokers)."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, update

from db.migrate import upgrade
from db.tables import Job, JobStatus, Patient, Series, Study, utcnow
from node.config import Settings
from node.leases import Lease
from node.workflow import jobs
from node.workflow.enqueue import Enqueuer
from tests.conftest import PACSNODE


class _Broker:
    """Records what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []

    def send_task(self, name: str, args: list[Any], queue: str, **_: Any) -> None:
        self.sent.append((name, args, queue))


def _database(tmp_path: Path, series: int = 2) -> Any:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(Patient.__table__.insert().values(id=1, patient_id="P"))
        study = conn.execute(Study.__table__.insert().values(
            id=1, patient_fk=1, study_instance_uid="1.2.3",
            status="processing")).inserted_primary_key[0]
        for number in range(series):
            series_id = conn.execute(Series.__table__.insert().values(
                series_instance_uid=f"1.2.3.{number}", study_fk=study,
                modality="CT")).inserted_primary_key[0]
            conn.execute(Job.__table__.insert().values(
                study_fk=study, series_fk=series_id, status=JobStatus.QUEUED.value,
                queued_at=now, destinations="[]", reason="", instances=1, attempt=0,
                timings="{}"))
    return engine


def _settings(**jobs_config: Any) -> Settings:
    return Settings.model_validate({"jobs": {
        "executor": "celery", "broker_url": "amqp://guest:guest@127.0.0.1:5672//",
        "queue_prefix": "t", **jobs_config}, "routes": []})


def test_each_queued_job_is_sent_once_then_again_only_when_stale(tmp_path: Path) -> None:
    engine = _database(tmp_path)
    broker = _Broker()
    enqueuer = Enqueuer(engine, _settings(requeue_after_s=60), broker)
    assert enqueuer.send_jobs() == 2
    assert enqueuer.send_jobs() == 0  # sent: not again while the message may be waiting
    assert [(name, queue) for name, _, queue in broker.sent] == \
        [("pacsnode.analyse", "t.analysis")] * 2
    # The broker lost the messages: an hour later the jobs are still queued.
    with engine.begin() as conn:
        conn.execute(update(Job.__table__).values(
            enqueued_at=utcnow() - timedelta(seconds=61)))
    assert enqueuer.send_jobs() == 2
    assert sorted(args[0] for _, args, _ in broker.sent) == [1, 1, 2, 2]


def test_a_broker_that_refuses_leaves_the_job_to_be_sent_again(tmp_path: Path) -> None:
    engine = _database(tmp_path, series=1)

    class Down(_Broker):
        def send_task(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionRefusedError("broker down")

    try:
        Enqueuer(engine, _settings(), Down()).send_jobs()
    except ConnectionRefusedError:
        pass
    broker = _Broker()
    assert Enqueuer(engine, _settings(), broker).send_jobs() == 1


def test_a_claim_takes_a_job_once(tmp_path: Path) -> None:
    engine = _database(tmp_path, series=1)
    first, second = Lease("worker-a", 30), Lease("worker-b", 30)
    assert jobs.claim_job(engine, 1, first) == "claimed"
    assert jobs.claim_job(engine, 1, second) == "running"  # a duplicate task
    with engine.begin() as conn:
        jobs.finish_job(conn, 1, JobStatus.DONE, "", {}, owner="worker-a")
    assert jobs.claim_job(engine, 1, second) == "gone"
    assert jobs.claim_job(engine, 99, second) == "gone"


def test_a_job_waits_while_its_series_has_one_running(tmp_path: Path) -> None:
    engine = _database(tmp_path, series=1)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(Job.__table__.insert().values(
            study_fk=1, series_fk=1, status=JobStatus.QUEUED.value, queued_at=now,
            destinations="[]", reason="", instances=2, attempt=0, timings="{}"))
    assert jobs.claim_job(engine, 1, Lease("a", 30)) == "claimed"
    assert jobs.claim_job(engine, 2, Lease("b", 30)) == "waiting"


def test_an_interrupted_job_is_sent_again_at_once(tmp_path: Path) -> None:
    engine = _database(tmp_path, series=1)
    broker = _Broker()
    enqueuer = Enqueuer(engine, _settings(lease_s=1), broker)
    assert enqueuer.send_jobs() == 1
    assert jobs.claim_job(engine, 1, Lease("dead-worker", 1)) == "claimed"
    later = utcnow() + timedelta(seconds=5)  # its lease ran out
    assert jobs.take_over_expired(engine, later, max_attempts=3) == 1
    assert enqueuer.send_jobs() == 1


def test_worker_needs_the_celery_executor(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PACSNODE__STORAGE__DATA_DIR": str(tmp_path / "var")}
    result = subprocess.run([*PACSNODE, "worker"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "jobs.executor: pacsnode worker needs executor: celery" in result.stderr
    env["PACSNODE__JOBS__EXECUTOR"] = "celery"
    result = subprocess.run([*PACSNODE, "worker"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "jobs" in result.stderr and "broker_url is required" in result.stderr
    env["PACSNODE__JOBS__BROKER_URL"] = "amqp://guest:guest@127.0.0.1:5672//"
    result = subprocess.run([*PACSNODE, "worker", "--queues", "analysis,nonsense"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--queues" in result.stderr
