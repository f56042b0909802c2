"""DCMTK's echoscu and storescu against a node running as a subprocess."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydicom import dcmread

from analysis.phantoms.dicom_series import SeriesInfo
from tests.conftest import NodeProcess, dcmtk_env, make_series, query, require_tool

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def _associations(node: NodeProcess, timeout: float = 10) -> list[dict[str, Any]]:
    """The node's association log, oldest first, once every association is closed: the
    node closes a record after its last answer, so the peer may have exited already."""
    deadline = time.monotonic() + timeout
    while True:
        rows = query(node.db_url, "select calling_ae, called_ae, peer_host, outcome, "
                     "instances_stored, instances_duplicate, instances_failed, started_at, "
                     "ended_at from associations order by id")
        if all(r["outcome"] != "open" for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _responses(result: subprocess.CompletedProcess[str], status: str) -> int:
    return (result.stdout + result.stderr).count(f"Received Store Response ({status})")


def test_echoscu_gets_success(sqlite_node: NodeProcess) -> None:
    require_tool("echoscu")
    result = subprocess.run(
        ["echoscu", "-v", "-aec", sqlite_node.ae_title, "127.0.0.1", str(sqlite_node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr
    # The verification is audited like any other association, with nothing stored.
    (record,) = _associations(sqlite_node)
    assert (record["calling_ae"], record["called_ae"], record["peer_host"]) == (
        "ECHOSCU", "PACSNODE", "127.0.0.1")
    assert (record["outcome"], record["instances_stored"], record["instances_failed"]) == (
        "released", 0, 0)
    assert sqlite_node.studies() == []


def test_storescu_series_is_stored_and_indexed(node: NodeProcess, ct_series: SeriesInfo) -> None:
    require_tool("storescu")
    sent_at = datetime.now(timezone.utc)
    result = node.storescu(*ct_series.paths)
    assert _responses(result, "Success") == len(ct_series.paths), result.stdout + result.stderr

    _check_study(node, ct_series, sent_at)
    _check_index(node, ct_series)
    _check_files(node, ct_series)
    _check_audit(node, ct_series)


def _check_study(node: NodeProcess, series: SeriesInfo, sent_at: datetime) -> None:
    """The study's row holds what the sender's headers said, and when it arrived."""
    (study,) = node.studies()
    assert study["study_instance_uid"] == series.study_instance_uid
    assert (study["patient_id"], study["patient_name"]) == ("PHANTOM-001", "Phantom^Chest")
    assert (study["accession_number"], study["study_description"]) == ("SYN0001", "Synthetic CT")
    assert study["study_date"] == dcmread(series.paths[0]).StudyDate
    assert study["status"] == "receiving"
    assert study["instances"] == len(series.paths)
    assert study["series"] == [
        {
            "series_instance_uid": series.series_instance_uid,
            "modality": "CT",
            "series_number": 1,
            "series_description": "Synthetic chest CT",
            "body_part_examined": "CHEST",
            "instances": len(series.paths),
        }
    ]
    received = datetime.fromisoformat(study["received_at"])
    last = datetime.fromisoformat(study["last_received_at"])
    assert sent_at <= received <= last <= datetime.now(timezone.utc), study
    assert study["stable_at"] is None  # study.stable_age_s is 30 s in these tests


def _check_index(node: NodeProcess, series: SeriesInfo) -> None:
    """One instance row per instance sent, each pointing at its file with its size."""
    rows = query(node.db_url, "select sop_instance_uid, sop_class_uid, instance_number, "
                 "file_path, file_size, transfer_syntax_uid from instances")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(series.sop_instance_uids)
    for row in rows:
        sent = dcmread(series.paths[series.sop_instance_uids.index(row["sop_instance_uid"])])
        assert (row["sop_class_uid"], row["instance_number"]) == (
            sent.SOPClassUID, sent.InstanceNumber)
        assert row["file_path"] == (f"studies/{series.study_instance_uid}/"
                                    f"{series.series_instance_uid}/{row['sop_instance_uid']}.dcm")
        assert row["file_size"] == (node.data_dir / row["file_path"]).stat().st_size, row
        assert row["transfer_syntax_uid"] == EXPLICIT_VR_LITTLE_ENDIAN


def _check_files(node: NodeProcess, series: SeriesInfo) -> None:
    """Every file is on disk, parseable, with every element the sender had."""
    for path, sop_uid in zip(series.paths, series.sop_instance_uids):
        stored = (node.data_dir / "studies" / series.study_instance_uid
                  / series.series_instance_uid / f"{sop_uid}.dcm")
        original = dcmread(path)
        copy = dcmread(stored)
        assert copy == original  # Dataset equality: every element, pixels included
        assert copy.file_meta.MediaStorageSOPInstanceUID == sop_uid
        assert copy.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert copy.file_meta.SourceApplicationEntityTitle == "STORESCU"


def _check_audit(node: NodeProcess, series: SeriesInfo) -> None:
    """One released association from STORESCU that stored exactly the series."""
    (record,) = _associations(node)
    assert (record["instances_stored"], record["instances_duplicate"],
            record["instances_failed"]) == (len(series.paths), 0, 0)
    detail = node.study(series.study_instance_uid)
    (assoc,) = detail["associations"]
    assert (assoc["calling_ae"], assoc["called_ae"], assoc["outcome"]) == (
        "STORESCU", "PACSNODE", "released")
    assert assoc["instances_of_this_study"] == len(series.paths)
    assert assoc["peer"].startswith("127.0.0.1:")
    started, ended = (datetime.fromisoformat(assoc[k]) for k in ("started_at", "ended_at"))
    assert started <= ended
    assert [(e["from"], e["to"]) for e in detail["events"]] == [(None, "receiving")]


def test_wrong_called_ae_title_is_rejected(sqlite_node: NodeProcess,
                                           ct_series: SeriesInfo) -> None:
    require_tool("storescu")
    result = sqlite_node.storescu(ct_series.paths[0], called="NOTME", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Association Rejected" in output
    assert "Reason: Called AE Title Not Recognized" in output, output
    assert sqlite_node.studies() == []
    assert query(sqlite_node.db_url, "select count(*) as n from instances") == [{"n": 0}]
    (record,) = _associations(sqlite_node)
    assert (record["calling_ae"], record["called_ae"], record["outcome"]) == (
        "STORESCU", "NOTME", "rejected")
    assert record["instances_stored"] == 0


def test_several_associations_at_once(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    require_tool("storescu")
    series = [make_series(tmp_path / f"s{i}", slices=6, seed=i) for i in range(4)]
    procs = [
        subprocess.Popen(
            ["storescu", "-v", "-aet", f"SENDER{i}", "-aec", sqlite_node.ae_title,
             "127.0.0.1", str(sqlite_node.port), *map(str, s.paths)],
            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, s in enumerate(series)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert out.count("Received Store Response (Success)") == 6, out

    records = sorted((r["calling_ae"], r["outcome"], r["instances_stored"])
                     for r in _associations(sqlite_node))
    assert records == [(f"SENDER{i}", "released", 6) for i in range(4)]
    # Each study holds exactly its own series, delivered by its own sender.
    studies = {s["study_instance_uid"]: s for s in sqlite_node.studies()}
    assert set(studies) == {s.study_instance_uid for s in series}
    for i, sent in enumerate(series):
        study = studies[sent.study_instance_uid]
        assert [(x["series_instance_uid"], x["instances"]) for x in study["series"]] == [
            (sent.series_instance_uid, 6)]
        detail = sqlite_node.study(sent.study_instance_uid)
        assert [(a["calling_ae"], a["outcome"], a["instances_of_this_study"])
                for a in detail["associations"]] == [(f"SENDER{i}", "released", 6)]
    rows = query(sqlite_node.db_url, "select sop_instance_uid from instances")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(
        uid for s in series for uid in s.sop_instance_uids)
