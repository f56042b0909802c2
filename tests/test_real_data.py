"""Real scanner data from ../shared/data (skipped when it is absent, as in a user's clone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import SHARED_DATA, NodeProcess

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent"
)


def test_real_tilted_ct_and_liver_study_with_seg(sqlite_node: NodeProcess) -> None:
    tilted = SHARED_DATA / "ct-phantom-tilted"
    liver = SHARED_DATA / "ct-liver-3slice"
    result = sqlite_node.cli("send", str(tilted), str(liver), "--quiet", "--json", check=False)
    summary = json.loads(result.stdout)
    # LICENSE files are reported as not DICOM; the DICOMDIR is skipped, not sent.
    assert {Path(f["path"]).name for f in summary["failures"]} == {"LICENSE"}
    assert [Path(p).name for p in summary["skipped"]] == ["DIRFILE.dcm"]

    sent = [p for p in [*tilted.rglob("*"), *liver.rglob("*")] if p.is_file()]
    dicom = []
    for path in sent:
        if path.name in ("LICENSE", "DIRFILE.dcm"):
            continue
        dicom.append((path, dcmread(path, stop_before_pixels=True)))
    studies = {s["study_instance_uid"]: s for s in sqlite_node.studies()}
    assert sum(s["instances"] for s in studies.values()) == len(dicom)
    modalities = {series["modality"] for s in studies.values() for series in s["series"]}
    assert {"CT", "SEG"} <= modalities

    for path, header in dicom:
        stored = (sqlite_node.data_dir / "studies" / header.StudyInstanceUID
                  / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm")
        assert stored.is_file(), path
        assert dcmread(stored).PixelData == dcmread(path).PixelData
