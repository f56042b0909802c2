"""DCMTK's echoscu and storescu against a node running as a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.conftest import NodeProcess, dcmtk_env, require_tool


def test_echoscu_gets_success(sqlite_node: NodeProcess) -> None:
    require_tool("echoscu")
    result = subprocess.run(
        ["echoscu", "-v", "-aec", sqlite_node.ae_title, "127.0.0.1", str(sqlite_node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_storescu_series_is_stored_and_indexed(node: NodeProcess, ct_series) -> None:
    require_tool("storescu")
    result = node.storescu(*ct_series.paths)
    assert result.stdout.count("Received Store Response (Success)") + result.stderr.count(
        "Received Store Response (Success)") == len(ct_series.paths)

    studies = node.studies()
    assert len(studies) == 1
    study = studies[0]
    assert study["study_instance_uid"] == ct_series.study_instance_uid
    assert study["patient_id"] == "PHANTOM-001"
    assert study["status"] == "receiving"
    assert study["instances"] == len(ct_series.paths)
    assert study["series"] == [
        {
            "series_instance_uid": ct_series.series_instance_uid,
            "modality": "CT",
            "series_number": 1,
            "series_description": "Synthetic chest CT",
            "body_part_examined": "CHEST",
            "instances": len(ct_series.paths),
        }
    ]
    for key in ("received_at", "stable_at"):
        assert key in study

    # Every file is on disk, parseable, with the pixels the sender had.
    for path, sop_uid in zip(ct_series.paths, ct_series.sop_instance_uids):
        stored = (node.data_dir / "studies" / ct_series.study_instance_uid
                  / ct_series.series_instance_uid / f"{sop_uid}.dcm")
        original = dcmread(path)
        copy = dcmread(stored)
        assert copy.SOPInstanceUID == sop_uid
        assert copy.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert copy.PixelData == original.PixelData

    detail = node.study(ct_series.study_instance_uid)
    assert [a["calling_ae"] for a in detail["associations"]] == ["STORESCU"]
    assert detail["associations"][0]["outcome"] == "released"
    assert detail["events"][0]["to"] == "receiving"


def test_wrong_called_ae_title_is_rejected(sqlite_node: NodeProcess, ct_series) -> None:
    require_tool("storescu")
    result = sqlite_node.storescu(ct_series.paths[0], called="NOTME", check=False)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert sqlite_node.studies() == []


def test_several_associations_at_once(sqlite_node: NodeProcess, tmp_path: Path) -> None:
    require_tool("storescu")
    from tests.conftest import make_series

    series = [make_series(tmp_path / f"s{i}", slices=6, seed=i) for i in range(4)]
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", sqlite_node.ae_title, "127.0.0.1", str(sqlite_node.port),
             *map(str, s.paths)],
            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for s in series
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    studies = {s["study_instance_uid"]: s for s in sqlite_node.studies()}
    assert set(studies) == {s.study_instance_uid for s in series}
    assert all(study["instances"] == 6 for study in studies.values())
