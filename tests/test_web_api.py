"""The REST API and the operations endpoints of a running node that analysed a study:
JSON exactly as the CLI prints it, downloads, actions, /ready and /metrics."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import requests

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import PACSNODE, NodeProcess, free_port, query, require_tool
from tests.orthanc import free_ports
from tests.test_return_to_pacs import analysing_node, wait_until
from tests.web_helpers import add_user, cli, wait_web

SPEC = PhantomSpec(slices=16, rows=96, columns=96, pixel_spacing_mm=4.0, seed=2)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels}")


def _bearer(node: NodeProcess, name: str, role: str) -> dict[str, str]:
    add_user(node, name, role)
    token = cli(node, "token", "create", "--user", name).stdout.strip()
    return {"Authorization": f"Bearer {token}"}


def test_api_metrics_and_actions(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu")
    (closed_port,) = free_ports(1)
    node = analysing_node(make_node, ("pacs", closed_port), PACSNODE__DELIVERY__MAX_AGE_H="0.0005")
    ct = write_ct_series(make_phantom(SPEC), tmp_path / "ct")
    node.storescu(*ct.paths)
    node.storescu(ct.paths[0], called="SOMEONE_ELSE", check=False)
    study = ct.study_instance_uid
    wait_until(lambda: len(query(node.db_url, "SELECT id FROM deliveries WHERE status = "
                                 "'failed'")) == 2, 180, f"the analysis\n{node.log()[-2000:]}")
    url, auditor = node.web_url, _bearer(node, "otto", "auditor")
    viewer, admin = _bearer(node, "vera", "viewer"), _bearer(node, "ada", "admin")

    # The same JSON as the command line, so scripts move over unchanged.
    listed = requests.get(f"{url}/api/studies", headers=viewer, timeout=30).json()
    assert listed["total"] == 1 and listed["studies"] == node.studies()
    detail = requests.get(f"{url}/api/studies/{study}", headers=viewer, timeout=30).json()
    assert detail == node.study(study)
    assert requests.get(f"{url}/api/studies/1.2.3", headers=viewer, timeout=10
                        ).status_code == 404

    results = {r["kind"]: r for r in detail["series"][0]["analysis"]["results"]}
    sr = results["sr"]
    table = requests.get(f"{url}/api/studies/{study}/results/{sr['result_id']}/measurements",
                         headers=viewer, timeout=30).json()
    by_label = {row["label"]: row for row in table["structures"]}
    assert set(by_label) == {"Body", "Left lung", "Right lung"}
    assert by_label["Left lung"]["volume_ml"] > 100 and table["region"]["label"] == "chest"
    file_url = f"{url}/api/studies/{study}/results/{sr['result_id']}/file"
    assert requests.get(file_url, headers=viewer, timeout=10).status_code == 403
    download = requests.get(file_url, headers=auditor, timeout=30)
    assert download.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(download.content)).SOPInstanceUID == sr["sop_instance_uid"]

    jobs = requests.get(f"{url}/api/jobs", headers=viewer, timeout=10).json()
    assert [j["status"] for j in jobs["jobs"]] == ["done"]
    failed = requests.get(f"{url}/api/deliveries", params={"status": "failed"},
                          headers=viewer, timeout=10).json()
    assert failed["total"] == 2 and {d["kind"] for d in failed["deliveries"]} == {"seg", "sr"}
    rejected = requests.get(f"{url}/api/associations", params={"outcome": "rejected"},
                            headers=viewer, timeout=10).json()["associations"]
    assert "SOMEONE_ELSE" in rejected[0]["reason"] and rejected[0]["tls"] is False

    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert _metric(metrics, "pacsnode_instances") == len(ct.paths)
    assert _metric(metrics, "pacsnode_associations", outcome="released") == 1
    assert _metric(metrics, "pacsnode_associations", outcome="rejected") == 1
    assert _metric(metrics, "pacsnode_jobs", status="done") == 1
    assert _metric(metrics, "pacsnode_deliveries", status="failed", destination="pacs0") == 2
    assert _metric(metrics, "pacsnode_job_step_seconds_count", step="total") == 1
    assert _metric(metrics, "pacsnode_cstore_seconds_count") == len(ct.paths)
    assert _metric(metrics, "pacsnode_cstore_answers_total", status="success") == len(ct.paths)
    again = requests.get(f"{url}/metrics", timeout=10).text  # counted once, not per scrape
    assert _metric(again, "pacsnode_job_step_seconds_count", step="total") == 1

    delivery = failed["deliveries"][0]["id"]
    assert requests.post(f"{url}/api/deliveries/{delivery}/resend", headers=auditor,
                         timeout=10).status_code == 403
    resent = requests.post(f"{url}/api/deliveries/{delivery}/resend", headers=admin, timeout=10)
    assert resent.json() == {"resent": [delivery]}
    rerun = requests.post(f"{url}/api/studies/{study}/rerun", headers=admin, timeout=10,
                          json={"series_instance_uid": ct.series_instance_uid})
    assert rerun.status_code == 200 and len(rerun.json()["queued"]) == 1
    wait_until(lambda: len(query(node.db_url, "SELECT id FROM jobs WHERE status = 'done'")) == 2,
               120, "the re-run")
    log = requests.get(f"{url}/api/access-log", headers=auditor, timeout=10).json()["events"]
    actions = [(e["username"], e["action"], e["outcome"]) for e in reversed(log)]
    for expected in [("vera", "search", "ok"), ("vera", "view_study", "ok"),
                     ("otto", "download", "ok"), ("vera", "denied", "refused"),
                     ("ada", "resend", "ok"), ("ada", "rerun", "ok")]:
        assert expected in actions, (expected, actions)
    for action in ("view_study", "download", "rerun", "resend"):
        event = next(e for e in log if e["action"] == action and e["outcome"] == "ok")
        assert (event["study_instance_uid"], event["patient_id"]) == (study, "PHANTOM-001")
    docs = requests.get(f"{url}/api/openapi.json", timeout=10).json()
    assert {"/api/studies", "/api/studies/{uid}", "/api/deliveries/{delivery_id}/resend"} \
        <= set(docs["paths"])
    assert requests.get(f"{url}/api/docs", timeout=10).status_code == 200


def test_ready_says_what_is_wrong(tmp_path: Path) -> None:
    """`pacsnode web` alone: 503 naming the storage while the data folder is unusable."""
    data = tmp_path / "var"
    node = NodeProcess(data_dir=data, port=free_port(),
                       db_url=f"sqlite:///{tmp_path / 'db' / 'pacsnode.db'}")
    data.mkdir()
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen([*PACSNODE, "web"], env=node.env, stdout=log, stderr=log)
    try:
        wait_web(node.web_url)
        ready = requests.get(f"{node.web_url}/ready", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "storage": "ok",
                                          "dicom": "not served by this process"}
        shutil.rmtree(data)
        data.write_text("not a folder")
        ready = requests.get(f"{node.web_url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert ready.json()["checks"]["storage"].startswith("not writable")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_dicom_listener_is_part_of_ready(sqlite_node: NodeProcess) -> None:
    ready = requests.get(f"{sqlite_node.web_url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"]["dicom"] == "ok"
