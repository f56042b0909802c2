"""Ownership by lease: correct after a crash as PID 1 of a container, with the same host
name or a new one, after a clean stop, and under concurrency on PostgreSQL.

Real processes: the node runs as PID 1 of its own PID namespace (``unshare``), as in a
container, and is killed with SIGKILL while it analyses a study.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from db.migrate import upgrade
from db.tables import Job, JobStatus, Patient, Series, Study
from tests.conftest import NodeProcess, missing_peer, query, require_tool
from tests.orthanc import Orthanc
from tests.test_return_to_pacs import analysing_node, wait_until

# Big enough that the job is still running when the node is killed.
SLOW = PhantomSpec(slices=60, rows=256, columns=256, pixel_spacing_mm=1.5, seed=4)
SAME_HOST = ["unshare", "--pid", "--kill-child", "--mount-proc"]
NEW_HOST = [*SAME_HOST, "--uts", "sh", "-c", 'hostname pod-rescheduled && exec "$0" "$@"']


def _require_namespaces() -> None:
    if shutil.which("unshare") is None:
        missing_peer("unshare (util-linux) is not installed")


def _job(node: NodeProcess, study_uid: str) -> dict[str, Any]:
    """The series' latest job ({} until the study is routed)."""
    return node.study(study_uid)["series"][0]["analysis"] or {}


@pytest.mark.parametrize("restart", [SAME_HOST, NEW_HOST], ids=["same-host", "new-host"])
def test_pid_1_killed_mid_job_finishes_and_delivers_once(
        make_node: Any, orthanc: Orthanc, tmp_path: Path, restart: list[str]) -> None:
    require_tool("storescu")
    _require_namespaces()
    ct = write_ct_series(make_phantom(SLOW), tmp_path / "ct")
    node = analysing_node(make_node, ("orthanc", orthanc.dicom_port),
                          PACSNODE__JOBS__LEASE_S="3")
    node.stop()
    node.prefix = SAME_HOST
    node.start()
    node.storescu(*ct.paths)
    wait_until(lambda: _job(node, ct.study_instance_uid).get("status") == "running", 90,
               "the job to start")
    node.kill()  # SIGKILL to PID 1: the namespace, workers included, dies with it

    node.prefix = restart
    node.start()
    counts = wait_until(
        lambda: (c := orthanc.modalities_of_study(ct.study_instance_uid)).get("SR") and c,
        timeout=180, what=f"the SEG and SR in Orthanc\n{node.log()[-3000:]}")
    job = wait_until(lambda: (j := _job(node, ct.study_instance_uid)).get("status") == "done"
                     and j, 60, "the job to be done")
    assert job["attempt"] == 2
    assert counts == {"SEG": 1, "SR": 1}  # exactly once
    assert sorted((r["kind"], [d["status"] for d in r["deliveries"]])
                  for r in job["results"]) == [("preview", []), ("seg", ["sent"]),
                                               ("sr", ["sent"])]
    # Both starts were PID 1; the identities differ, and so does the host if rescheduled.
    # (the first row is make_node's own start, before the namespaced ones)
    starts = query(node.db_url, "SELECT host, pid FROM node_processes ORDER BY started_at")[1:]
    assert [s["pid"] for s in starts] == [1, 1]
    if restart is NEW_HOST:
        assert starts[1]["host"] == "pod-rescheduled" != starts[0]["host"]
    else:
        assert starts[0]["host"] == starts[1]["host"]
    assert "stopped renewing its lease; taking it over" in node.log()


def test_a_clean_stop_releases_the_running_job_at_once(make_node: Any,
                                                      tmp_path: Path) -> None:
    """SIGTERM: the next process takes the job over without waiting for the lease."""
    require_tool("storescu")
    ct = write_ct_series(make_phantom(SLOW), tmp_path / "ct")
    node = analysing_node(make_node, PACSNODE__JOBS__LEASE_S="120")
    node.storescu(*ct.paths)
    wait_until(lambda: _job(node, ct.study_instance_uid).get("status") == "running", 90,
               "the job to start")
    assert node.proc is not None
    stopping = time.monotonic()
    node.stop()  # SIGTERM
    assert time.monotonic() - stopping < 20  # node.shutdown_timeout_s
    node.start()
    job = wait_until(lambda: (j := _job(node, ct.study_instance_uid)).get("status") == "done"
                     and j, 100, "the job to be done")
    assert job["attempt"] == 2
    # Taken over long before its 120 s lease would have run out.
    assert time.monotonic() - stopping < 110


def test_sigterm_drains_the_c_stores_in_flight(make_node: Any, tmp_path: Path) -> None:
    """Stop accepting, answer what is in flight, refuse the rest with 0xA700: every
    instance the sender was told is stored is stored, and nothing else is claimed."""
    require_tool("storescu")
    import subprocess

    from tests.conftest import dcmtk_env, make_series

    # Large enough that SIGTERM lands mid-transfer even on a loaded machine.
    series = make_series(tmp_path / "ct", slices=400, size=256)
    node = make_node()
    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port),
             *map(str, series.paths)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while log_path.read_text().count("(Success)") < 20:
            assert time.monotonic() < deadline and sender.poll() is None, log_path.read_text()
            time.sleep(0.005)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(timeout=30)
        sender.wait(timeout=60)
    output = log_path.read_text()
    acknowledged = output.count("Received Store Response (Success)")
    assert 20 <= acknowledged < len(series.paths), output[-2000:]
    # The one in flight was answered; the next was refused, so the sender keeps it.
    assert "Refused: OutOfResources" in output, output[-3000:]
    stopped = node.log()
    assert "shutting down" in stopped and "Traceback" not in stopped, stopped[-3000:]
    node.start()
    stored = query(node.db_url, "SELECT sop_instance_uid FROM instances")
    assert len(stored) == acknowledged
    outcomes = query(node.db_url, "SELECT outcome FROM associations")
    assert outcomes in ([{"outcome": "aborted"}], [{"outcome": "released"}]), outcomes


# -- PostgreSQL, several workers ---------------------------------------------------


def _study_of_two_series(engine: Any) -> None:
    """Study 1 (processing) of patient 1, with series 1 and 2."""
    with engine.begin() as conn:
        conn.execute(Patient.__table__.insert().values(id=1, patient_id="P"))
        conn.execute(Study.__table__.insert().values(
            id=1, patient_fk=1, study_instance_uid="1.2.3", status="processing"))
        for number in (1, 2):
            conn.execute(Series.__table__.insert().values(
                id=number, study_fk=1, series_instance_uid=f"1.2.3.{number}", modality="CT"))


def test_two_workers_ending_a_studys_last_jobs_at_once_settle_it(postgres_url: str) -> None:
    """Without the study's row lock each transaction sees the other's job still running
    and neither settles the study: it would stay ``processing`` forever."""
    from node.workflow.jobs import finish_job

    engine = create_engine(postgres_url)
    upgrade(engine)
    _study_of_two_series(engine)
    with engine.begin() as conn:
        for number in (1, 2):
            conn.execute(Job.__table__.insert().values(
                id=number, study_fk=1, series_fk=number, status="running", attempt=1))
    first_counted = threading.Event()

    def end(job_id: int, hold_s: float) -> None:
        with engine.begin() as conn:
            finish_job(conn, job_id, JobStatus.DONE, "", {})
            first_counted.set()
            time.sleep(hold_s)  # still uncommitted while the other one counts

    first = threading.Thread(target=end, args=(1, 1.0))
    first.start()
    first_counted.wait(5)
    end(2, 0)
    first.join()
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM studies WHERE id = 1")).scalar_one()
    engine.dispose()
    assert status == "analyzed"


def test_two_workers_on_postgresql_analyse_a_study(make_node: Any, postgres_url: str,
                                                   tmp_path: Path) -> None:
    require_tool("storescu")
    study_uid = None
    paths = []
    for number in range(3):
        info = write_ct_series(make_phantom(PhantomSpec(slices=12, rows=96, columns=96,
                                                        pixel_spacing_mm=4.0, seed=number)),
                               tmp_path / f"s{number}", study_instance_uid=study_uid,
                               series_number=number + 1)
        study_uid = info.study_instance_uid
        paths += info.paths
    node = make_node(db_url=postgres_url, stable_age_s=1.0, extra_env={
        "PACSNODE__ROUTES": json.dumps([{"name": "ct", "match": {"modality": "CT"},
                                         "pipeline": "ct-body-lungs"}]),
        "PACSNODE__JOBS__WORKERS": "2"})
    node.storescu(*paths)
    detail = wait_until(lambda: (d := node.study(study_uid))["status"] == "analyzed" and d,
                        240, "the study to be analysed")
    assert sorted(s["analysis"]["status"] for s in detail["series"]) == ["done"] * 3
    owners = query(postgres_url, "SELECT DISTINCT owner FROM jobs")
    assert len(owners) == 1 and owners[0]["owner"]
    assert json.loads(json.dumps(detail))  # serialisable as the CLI prints it


def test_a_series_new_job_waits_for_its_running_one(tmp_path: Path) -> None:
    """A study reopened while its job runs: the new job is not claimed until the running
    one has ended, so two runs never race to results for the same series."""
    from db.session import make_engine
    from node import leases
    from node.workflow.jobs import claim_jobs, finish_job

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    lease = leases.register(engine, 30, "test")
    _study_of_two_series(engine)
    with engine.begin() as conn:
        conn.execute(Job.__table__.insert().values(id=1, study_fk=1, series_fk=1,
                                                   status="queued"))
    assert claim_jobs(engine, 5, lease) == [1]
    with engine.begin() as conn:  # the series changed meanwhile; the other one is new
        conn.execute(Job.__table__.insert().values(id=2, study_fk=1, series_fk=1,
                                                   status="queued"))
        conn.execute(Job.__table__.insert().values(id=3, study_fk=1, series_fk=2,
                                                   status="queued"))
    assert claim_jobs(engine, 5, lease) == [3]
    with engine.begin() as conn:
        finish_job(conn, 1, JobStatus.DONE, "", {}, owner=lease.owner)
    assert claim_jobs(engine, 5, lease) == [2]
    with engine.begin() as conn:  # a job not ours any more cannot record results
        with pytest.raises(leases.LeaseLost):
            finish_job(conn, 2, JobStatus.DONE, "", {}, owner="someone-else")
    engine.dispose()
