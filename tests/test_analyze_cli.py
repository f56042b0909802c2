"""``pacsnode analyze``: offline, the same routing and pipeline as the node, one JSON report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import highdicom as hd
import pydicom
import pytest

from analysis.phantoms.dicom_series import write_ct_series
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from tests.conftest import SHARED_DATA, require_tool

SPEC = PhantomSpec(slices=16, rows=96, columns=96, pixel_spacing_mm=4.0, seed=5)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "node.cli", "analyze", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def dciodvfy_errors(path: str) -> list[str]:
    out = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def by_uid(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["series_instance_uid"]: item for item in report["series"]}


def test_analyze_a_folder(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    folder = tmp_path / "in"
    ct = write_ct_series(make_phantom(SPEC), folder / "ct")
    scout = write_ct_series(make_phantom(PhantomSpec(slices=1, rows=32, columns=32,
                                                     pixel_spacing_mm=12.0)), folder / "scout")
    for path in scout.paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    broken = write_ct_series(make_phantom(SPEC), folder / "broken")
    broken.paths[5].unlink()
    (folder / "notes.txt").write_text("not DICOM")

    result = analyze(str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr  # one series failed
    report = json.loads(result.stdout)
    series = by_uid(report)
    done = series[ct.series_instance_uid]
    assert done["status"] == "done" and done["pipeline"] == "ct-body-lungs"
    assert done["route"] == "ct" and done["instances"] == SPEC.slices
    segments = {s["label"]: s for s in done["segments"]}
    assert set(segments) == {"body", "lung_left", "lung_right"}
    assert 0.8 < segments["lung_left"]["volume_ml"] / segments["lung_right"]["volume_ml"] < 1.25
    assert segments["lung_left"]["mean_hu"] < -600 < segments["body"]["mean_hu"]
    for kind in ("seg", "sr"):
        assert dciodvfy_errors(done["outputs"][kind]) == []
    seg = hd.seg.segread(done["outputs"]["seg"])
    assert seg.StudyInstanceUID == ct.study_instance_uid
    preview = cv2.imread(done["outputs"]["preview"])
    assert preview is not None and preview.ndim == 3

    assert series[scout.series_instance_uid]["status"] == "skipped"
    assert "localizer" in series[scout.series_instance_uid]["reason"]
    failed = series[broken.series_instance_uid]
    assert failed["status"] == "failed" and "missing" in failed["reason"].lower()
    assert failed["outputs"] == {}
    assert any("notes.txt" in item for item in report["unreadable"])


def test_forced_pipeline_and_unknown_pipeline(tmp_path: Path) -> None:
    ct = write_ct_series(make_phantom(SPEC), tmp_path / "ct")
    result = analyze(str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--pipeline", "ct-body")
    assert result.returncode == 0, result.stderr
    (only,) = json.loads(result.stdout)["series"]
    assert only["series_instance_uid"] == ct.series_instance_uid
    assert [s["label"] for s in only["segments"]] == ["body"]

    wrong = analyze(str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--pipeline", "lungz")
    assert wrong.returncode == 2
    assert "no pipeline named 'lungz'" in wrong.stderr and "ct-body-lungs" in wrong.stderr
    missing = analyze(str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no real data at {SHARED_DATA}")
def test_real_scans(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    folder = tmp_path / "real"
    for name in ("ct-chest-slice", "ct-liver-3slice", "ct-phantom-tilted"):
        shutil.copytree(SHARED_DATA / name, folder / name)
    result = analyze(str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    statuses = sorted((s["instances"], s["status"]) for s in report["series"])
    # The dcmqi SEG is skipped; the chest slice, the 3 liver slices and the 54 tilted
    # head slices are analysed.
    assert statuses == [(1, "done"), (1, "skipped"), (3, "done"), (54, "done")]
    for item in report["series"]:
        if item["status"] == "skipped":
            assert "SEG" in item["reason"]
            continue
        labels = {s["label"] for s in item["segments"]}
        if item["instances"] == 1:  # the chest slice: both lungs
            assert labels == {"body", "lung_left", "lung_right"}
        if item["instances"] == 54:  # a head phantom: no lungs
            assert labels == {"body"}
        for kind in ("seg", "sr"):
            assert dciodvfy_errors(item["outputs"][kind]) == [], item["outputs"][kind]


def test_outputs_stay_inside_out_whatever_the_uids_say(tmp_path: Path) -> None:
    """A Series Instance UID is whatever a file says; it names no path outside --out."""
    series = write_ct_series(make_phantom(SPEC), tmp_path / "in")
    hostile = "../../escaped"
    with pydicom.config.disable_value_validation():
        for path in series.paths:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = hostile
            ds.save_as(path)
    out = tmp_path / "deep" / "er" / "out"
    result = analyze(str(tmp_path / "in"), "--out", str(out), "--pipeline", "ct-body-lungs-classical")
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)["series"]
    assert item["series_instance_uid"] == hostile and item["status"] == "done"
    for written in item["outputs"].values():
        assert Path(written).parent == out and Path(written).name.startswith("series-")
    assert not list(tmp_path.glob("deep/escaped*")) and not list(tmp_path.glob("escaped*"))


def test_settings_the_encoders_would_refuse_are_refused_at_start(tmp_path: Path) -> None:
    for key, value in (("RESULTS__SEG_SERIES_NUMBER", "0"),
                       ("RESULTS__SR_SERIES_DESCRIPTION", "left\\\\right")):
        env = {"PATH": "/usr/bin:/bin", f"PACSNODE__{key}": value,
               "PACSNODE__STORAGE__DATA_DIR": str(tmp_path / "var")}
        result = subprocess.run([sys.executable, "-m", "node.cli", "serve"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert key.lower().replace("__", ".") in result.stderr, result.stderr
