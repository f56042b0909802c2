"""Scale-out: receivers that only receive and enqueue, Celery workers that analyse and
deliver, over a real RabbitMQ (or Redis), a real PostgreSQL and a real Orthanc.

Every process is a real ``pacsnode serve`` or ``pacsnode worker``; a worker is killed
with SIGKILL in the middle of a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from analysis.phantoms.dicom_series import SeriesInfo, write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import PACSNODE, NodeProcess, missing_peer, query, require_tool
from tests.orthanc import Orthanc
from tests.test_return_to_pacs import DEFAULT_ROUTES, wait_until

RABBITMQ_URL = os.environ.get("PACSNODE_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("PACSNODE_TEST_REDIS", "redis://127.0.0.1:6379/0")
# Still running when its worker is killed, on 2 busy cores.
SLOW = PhantomSpec(slices=60, rows=256, columns=256, pixel_spacing_mm=1.5, seed=4)
SMALL = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.0, seed=5)


def _reachable(url: str) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        missing_peer(f"no broker at {url}: {str(exc).splitlines()[0] if str(exc) else exc!r}")


@pytest.fixture
def prefix() -> Iterator[str]:
    """Queues of this test alone; deleted afterwards."""
    name = f"pacsnode-test-{uuid.uuid4().hex[:10]}"
    yield name
    from kombu import Connection

    for url in (RABBITMQ_URL, REDIS_URL):
        try:
            with Connection(url, connect_timeout=3) as conn:
                channel = conn.channel()
                for kind in ("analysis", "delivery"):
                    channel.queue_delete(f"{name}.{kind}")
        except Exception:
            pass


def celery_env(broker: str, prefix: str, orthanc: Orthanc) -> dict[str, str]:
    return {
        "PACSNODE__JOBS__EXECUTOR": "celery",
        "PACSNODE__JOBS__BROKER_URL": broker,
        "PACSNODE__JOBS__QUEUE_PREFIX": prefix,
        "PACSNODE__JOBS__LEASE_S": "4",
        "PACSNODE__ROUTES": DEFAULT_ROUTES,
        "PACSNODE__DESTINATIONS": json.dumps([{"name": "pacs", "ae_title": "ORTHANC",
                                               "host": "127.0.0.1",
                                               "port": orthanc.dicom_port}]),
        "PACSNODE__DELIVERY__RETRY_INITIAL_S": "0.5",
    }


@dataclass
class WorkerProcess:
    """A ``pacsnode worker`` subprocess with a receiver's environment."""

    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=lambda: ["--concurrency", "1"])
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([*PACSNODE, "worker", *self.args], env=self.env,
                                     stdout=log, stderr=log)
        wait_until(lambda: "ready." in self.log() or self.proc.poll() is not None, 120,
                   "the worker to be ready")
        assert self.proc.poll() is None, f"the worker exited:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> set[int]:
        assert self.proc is not None
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                               text=True).stdout.split()
        return {int(pid) for pid in found}

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Any]:
    workers: list[WorkerProcess] = []

    def factory(node: NodeProcess, *args: str) -> WorkerProcess:
        worker = WorkerProcess(node.env, tmp_path / f"worker-{len(workers)}.log",
                               list(args) or ["--concurrency", "1"])
        workers.append(worker)
        return worker.start()

    yield factory
    for worker in workers:
        worker.stop()


def _storescu(node: NodeProcess, paths: list[Path]) -> threading.Thread:
    thread = threading.Thread(target=node.storescu, args=paths)
    thread.start()
    return thread


def _jobs_of(db_url: str, study_uid: str) -> list[dict[str, Any]]:
    return query(db_url, "SELECT j.id, j.status, j.attempt, j.owner, j.reason FROM jobs j "
                 "JOIN studies s ON s.id = j.study_fk WHERE s.study_instance_uid = :uid "
                 "ORDER BY j.id", uid=study_uid)


def _pid_of_owner(db_url: str, owner: str) -> int:
    return int(query(db_url, "SELECT pid FROM node_processes WHERE id = :o", o=owner)[0]["pid"])


def test_two_receivers_and_two_workers_one_killed_mid_job(
        make_node: Any, make_worker: Any, postgres_url: str, orthanc: Orthanc, prefix: str,
        tmp_path: Path) -> None:
    require_tool("storescu", "pgrep")
    _reachable(RABBITMQ_URL)
    env = celery_env(RABBITMQ_URL, prefix, orthanc)
    shared = tmp_path / "shared-storage"
    receivers = [make_node(db_url=postgres_url, data_dir=shared, stable_age_s=2.0,
                           extra_env=env) for _ in range(2)]
    workers = [make_worker(receivers[0]) for _ in range(2)]

    split = write_ct_series(make_phantom(SLOW), tmp_path / "split")
    others = [write_ct_series(make_phantom(SMALL), tmp_path / f"s{i}") for i in range(2)]
    senders = [_storescu(receivers[0], split.paths[0::2]),
               _storescu(receivers[1], split.paths[1::2])]
    senders += [_storescu(receivers[i], info.paths) for i, info in enumerate(others)]
    for thread in senders:
        thread.join()

    running = wait_until(
        lambda: [j for j in _jobs_of(postgres_url, split.study_instance_uid)
                 if j["status"] == "running" and j["owner"]], 180,
        "the split study's job to run")[0]
    pid = _pid_of_owner(postgres_url, running["owner"])
    victim = next(w for w in workers if pid in w.children())
    victim.kill()  # SIGKILL: its child dies with it, mid-job

    studies: list[SeriesInfo] = [split, *others]
    for info in studies:
        wait_until(lambda info=info: orthanc.modalities_of_study(info.study_instance_uid)
                   .get("SR"), 300,
                   f"the SEG and SR of {info.study_instance_uid} in Orthanc\n"
                   f"{workers[1].log()[-3000:]}")
    for info in studies:
        assert orthanc.modalities_of_study(info.study_instance_uid) == {"SEG": 1, "SR": 1}
        jobs = _jobs_of(postgres_url, info.study_instance_uid)
        assert [j["status"] for j in jobs] == ["done"], jobs  # routed and analysed once
    (taken_over,) = _jobs_of(postgres_url, split.study_instance_uid)
    assert taken_over["attempt"] == 2
    assert taken_over["owner"] is None or taken_over["owner"] != running["owner"]

    # The split study's instances came in through both receivers, into one series.
    arrivals = query(postgres_url, """
        SELECT a.owner, count(*) AS n FROM instances i
        JOIN associations a ON a.id = i.association_fk
        JOIN series se ON se.id = i.series_fk
        WHERE se.series_instance_uid = :uid GROUP BY a.owner""",
                     uid=split.series_instance_uid)
    assert sorted(row["n"] for row in arrivals) == [30, 30]
    assert query(postgres_url, "SELECT count(*) AS n FROM series WHERE series_instance_uid "
                 "= :uid", uid=split.series_instance_uid)[0]["n"] == 1
    # The receivers never analysed: every job ran in a worker process.
    receiver_ids = {r["id"] for r in query(postgres_url, "SELECT id, pid FROM node_processes")
                    if r["pid"] in {n.proc.pid for n in receivers if n.proc}}
    assert not receiver_ids & {r["owner"] for r in query(postgres_url,
                                                          "SELECT owner FROM jobs")}


@pytest.mark.parametrize("broker", [RABBITMQ_URL, REDIS_URL], ids=["rabbitmq", "redis"])
def test_a_study_through_a_worker(make_node: Any, make_worker: Any, postgres_url: str,
                                  orthanc: Orthanc, prefix: str, tmp_path: Path,
                                  broker: str) -> None:
    require_tool("storescu")
    _reachable(broker)
    node = make_node(db_url=postgres_url, stable_age_s=1.0,
                     extra_env=celery_env(broker, prefix, orthanc))
    make_worker(node)
    info = write_ct_series(make_phantom(SMALL), tmp_path / "ct")
    node.storescu(*info.paths)
    wait_until(lambda: orthanc.modalities_of_study(info.study_instance_uid).get("SR"), 240,
               "the SEG and SR in Orthanc")
    detail = node.study(info.study_instance_uid)
    assert detail["status"] == "analyzed"
    assert [d["status"] for r in detail["series"][0]["analysis"]["results"]
            for d in r["deliveries"]] == ["sent", "sent"]


def test_a_job_over_its_timeout_on_a_worker_is_retried_then_failed(
        make_node: Any, make_worker: Any, postgres_url: str, orthanc: Orthanc, prefix: str,
        tmp_path: Path) -> None:
    from tests.test_job_timeout import slow_model
    from tests.test_models_cli import user_card

    require_tool("storescu")
    _reachable(RABBITMQ_URL)
    slow_model(tmp_path / "slow.keras")
    user_card(tmp_path / "slow.json")
    env = celery_env(RABBITMQ_URL, prefix, orthanc)
    env.update({
        "PACSNODE__MODELS": json.dumps([{"name": "slow", "path": str(tmp_path / "slow.keras"),
                                         "card": str(tmp_path / "slow.json")}]),
        "PACSNODE__ROUTES": json.dumps([{"name": "slow", "match": {"modality": "CT"},
                                         "pipeline": "cnn", "model": "slow"}]),
        "PACSNODE__JOBS__TIMEOUT_S": "6", "PACSNODE__JOBS__MAX_ATTEMPTS": "2"})
    node = make_node(db_url=postgres_url, stable_age_s=1.0, extra_env=env)
    make_worker(node)
    info = write_ct_series(make_phantom(PhantomSpec(slices=96, rows=64, columns=64,
                                                    pixel_spacing_mm=6.0, seed=2)),
                           tmp_path / "ct")
    node.storescu(*info.paths)
    (job,) = wait_until(lambda: [j for j in _jobs_of(postgres_url, info.study_instance_uid)
                                 if j["status"] == "failed"], 240, "the job to fail")
    assert job["attempt"] == 2
    assert job["reason"] == "timed out after 6 s (2 attempts); giving up"


def test_the_same_study_sent_to_two_receivers_at_once_is_stored_once(
        make_node: Any, postgres_url: str, tmp_path: Path) -> None:
    require_tool("storescu")
    shared = tmp_path / "shared-storage"
    receivers = [make_node(db_url=postgres_url, data_dir=shared) for _ in range(2)]
    info = write_ct_series(make_phantom(SMALL), tmp_path / "ct")
    senders = [_storescu(receiver, info.paths) for receiver in receivers]
    for thread in senders:
        thread.join()
    rows = query(postgres_url, "SELECT count(*) AS n, count(DISTINCT file_path) AS files "
                 "FROM instances")
    assert rows == [{"n": len(info.paths), "files": len(info.paths)}]
    assert query(postgres_url, "SELECT count(*) AS n FROM studies")[0]["n"] == 1
    assert query(postgres_url, "SELECT count(*) AS n FROM series")[0]["n"] == 1
    stored = sorted(p.name for p in (shared / "studies").rglob("*.dcm"))
    assert len(stored) == len(info.paths)
