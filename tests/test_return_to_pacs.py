"""End to end through real processes: DCMTK storescu -> the node -> a real Orthanc PACS.

A stable study is routed, its CT series analysed in a worker process, and the SEG and
SR it produces are found in Orthanc, valid (dciodvfy, highdicom) and geometrically
right. The scout, the foreign SEG and a broken series in the same study are recorded
as skipped or failed, and never block the good series.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from analysis.phantoms.dicom_series import SeriesInfo, write_ct_series
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    PhantomSpec,
    make_phantom,
)
from tests.conftest import NodeProcess, require_tool
from tests.orthanc import Orthanc, free_ports

DEFAULT_ROUTES = json.dumps([{"name": "ct", "match": {"modality": "CT"},
                              "pipeline": "ct-body-lungs"}])
SPEC = PhantomSpec(slices=24, rows=128, columns=128, pixel_spacing_mm=3.0, seed=3)


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def analysing_node(make_node: Any, *destinations: tuple[str, int], **env: str) -> NodeProcess:
    dests = [{"name": f"pacs{i}", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}
             for i, (_, port) in enumerate(destinations)]
    return make_node(stable_age_s=1.0, extra_env={
        "PACSNODE__ROUTES": DEFAULT_ROUTES,
        "PACSNODE__DESTINATIONS": json.dumps(dests),
        "PACSNODE__DELIVERY__RETRY_INITIAL_S": "0.5",
        **env,
    })


def scout_series(folder: Path, study_uid: str) -> SeriesInfo:
    info = write_ct_series(make_phantom(PhantomSpec(slices=1, rows=64, columns=64,
                                                    pixel_spacing_mm=6.0)),
                           folder, study_instance_uid=study_uid, series_number=100,
                           series_description="Topogram")
    for path in info.paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    return info


def foreign_seg(folder: Path, ct: SeriesInfo) -> Path:
    """A SEG from another vendor in the same study: never analysed as images."""
    sources = [pydicom.dcmread(p) for p in ct.paths]
    for ds in sources:
        ds.PatientBirthDate, ds.ReferringPhysicianName = "", ""
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[:, 40:60, 40:60] = True
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type="BINARY",
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="box",
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT",
                                                           "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("39607008", "SCT", "Lung"),
            algorithm_type="MANUAL")],
        series_instance_uid=generate_uid(), series_number=50, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="OtherVendor", manufacturer_model_name="X",
        software_versions="1", device_serial_number="1")
    folder.mkdir(parents=True, exist_ok=True)
    seg.save_as(folder / "seg.dcm")
    return folder / "seg.dcm"


def test_seg_and_sr_reach_orthanc(make_node: Any, orthanc: Orthanc, tmp_path: Path) -> None:
    require_tool("storescu", "dciodvfy")
    node = analysing_node(make_node, ("orthanc", orthanc.dicom_port))
    phantom = make_phantom(SPEC)
    ct = write_ct_series(phantom, tmp_path / "ct")
    study = ct.study_instance_uid
    scout = scout_series(tmp_path / "scout", study)
    broken = write_ct_series(make_phantom(SPEC), tmp_path / "broken", study_instance_uid=study,
                             series_number=3, series_description="missing a slice")
    broken.paths[10].unlink()
    seg_path = foreign_seg(tmp_path / "seg", ct)
    node.storescu(*ct.paths, *scout.paths, *broken.paths[:10], *broken.paths[11:])
    # storescu proposes no context for SEG; our own sender carries it.
    node.cli("send", str(seg_path), "--quiet", "--host", "127.0.0.1",
             "--port", str(node.port), "--called-ae", node.ae_title)

    counts = wait_until(
        lambda: (c := orthanc.modalities_of_study(study)).get("SEG") and c.get("SR") and c,
        timeout=120, what=f"a SEG and an SR in Orthanc\n{node.log()[-3000:]}")
    assert counts == {"SEG": 1, "SR": 1}  # only our results: the node sent nothing else

    detail = wait_until(lambda: (d := node.study(study))["status"] == "analyzed" and d,
                        timeout=60, what="the study to be analyzed")
    by_series = {s["series_instance_uid"]: s["analysis"] for s in detail["series"]}
    done = by_series[ct.series_instance_uid]
    assert done["status"] == "done" and done["route"] == "ct"
    assert done["pipeline"] == "ct-body-lungs" and done["attempt"] == 1
    assert {"read", "volume", "encode_seg", "encode_sr", "total"} <= set(done["timings_s"])
    assert by_series[scout.series_instance_uid]["status"] == "skipped"
    assert "localizer" in by_series[scout.series_instance_uid]["reason"]
    seg_series = [s for s in detail["series"] if s["modality"] == "SEG"][0]
    assert seg_series["analysis"]["status"] == "skipped"
    assert "modality SEG" in seg_series["analysis"]["reason"]
    failed = by_series[broken.series_instance_uid]
    assert failed["status"] == "failed" and "cannot build a volume" in failed["reason"]
    kinds = {r["kind"]: r for r in done["results"]}
    assert set(kinds) == {"seg", "sr", "preview"}
    for kind in ("seg", "sr"):
        assert [(d["destination"], d["status"], d["attempts"]) for d in kinds[kind]["deliveries"]
                ] == [("pacs0", "sent", 1)]
    summary = [s for s in node.studies() if s["study_instance_uid"] == study][0]["results"]
    assert summary["results"] == 2 and summary["deliveries"] == {"sent": 2}
    assert summary["jobs"] == {"done": 1, "failed": 1, "skipped": 2}

    # What Orthanc holds is what the node made, and it is valid and right.
    files = {}
    for series in orthanc.series_of_study(study):
        modality = series["MainDicomTags"]["Modality"]
        files[modality] = tmp_path / f"from-orthanc.{modality}.dcm"
        files[modality].write_bytes(orthanc.download(series["Instances"][0]))
    for path in files.values():
        assert dciodvfy_errors(path) == [], path
    seg = hd.seg.segread(files["SEG"])
    assert seg.StudyInstanceUID == study
    assert seg.SOPInstanceUID == kinds["seg"]["sop_instance_uid"]
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert len(labels) == 3
    # Masks fetched per source instance and put back at that instance's slice: a SEG
    # with frames at the wrong positions would not match the phantom's labels.
    found = np.zeros((*phantom.labels.shape, 3), dtype=bool)
    for sop_uid, path in zip(ct.sop_instance_uids, ct.paths):
        z = int(pydicom.dcmread(path).InstanceNumber) - 1
        found[z] = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[sop_uid], segment_numbers=[1, 2, 3],
            assert_missing_frames_are_empty=True)[0]
    for number, label in ((1, None), (2, LABEL_LUNG_LEFT), (3, LABEL_LUNG_RIGHT)):
        truth = phantom.labels > 0 if label is None else phantom.labels == label
        mask = found[..., number - 1]
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.9, (labels[number - 1], dice)
    sr = hd.sr.srread(files["SR"])
    assert sr.StudyInstanceUID == study and sr.SOPInstanceUID == kinds["sr"]["sop_instance_uid"]
    groups = sr.content.get_volumetric_roi_measurement_groups()
    referenced = set()
    for group in groups:
        item = group.referenced_segment[0]  # the IMAGE item naming the SEG and segment
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        referenced.add(int(item.ReferencedSOPSequence[0].ReferencedSegmentNumber))
        units = {m.name.meaning: m.unit.value for m in group.get_measurements()}
        assert units["Volume"] == "mL" and units["Attenuation Coefficient"] == "[hnsf'U]"
    assert referenced == {1, 2, 3}


def test_deliveries_retry_until_the_pacs_answers(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu", "Orthanc")
    http_port, dicom_port = free_ports(2)
    node = analysing_node(make_node, ("late", dicom_port))
    ct = write_ct_series(make_phantom(SPEC), tmp_path / "ct")
    node.storescu(*ct.paths)

    def pending_with_error() -> dict[str, Any] | None:
        analysis = node.study(ct.study_instance_uid)["series"][0]["analysis"]
        if not analysis or not analysis["results"]:
            return None
        delivery = analysis["results"][0]["deliveries"][0]
        # Between two attempts (it is "sending" during one).
        return delivery if delivery["attempts"] >= 2 and delivery["status"] == "pending" \
            else None

    delivery = wait_until(pending_with_error, 120, f"failed attempts\n{node.log()[-3000:]}")
    assert delivery["status"] == "pending" and delivery["last_error"]
    assert delivery["next_attempt_at"] is not None

    orthanc = Orthanc.start(tmp_path / "orthanc", ports=(http_port, dicom_port))
    try:
        wait_until(lambda: (c := orthanc.modalities_of_study(ct.study_instance_uid))
                   .get("SEG") and c.get("SR"), 60, "the retried deliveries")
        def all_sent() -> dict[str, Any] | None:
            analysis = node.study(ct.study_instance_uid)["series"][0]["analysis"]
            statuses = [d["status"] for r in analysis["results"] for d in r["deliveries"]]
            return analysis if statuses and set(statuses) == {"sent"} else None

        analysis = wait_until(all_sent, 30, "deliveries marked sent")
        for result in analysis["results"]:
            for item in result["deliveries"]:
                assert item["attempts"] >= 3 and item["last_error"] == ""
    finally:
        orthanc.stop()


def test_interrupted_job_runs_again_after_restart(make_node: Any, tmp_path: Path) -> None:
    require_tool("storescu")
    # A slow job (a bigger series) so that the node can be killed while it runs.
    spec = PhantomSpec(slices=60, rows=256, columns=256, pixel_spacing_mm=1.5, seed=4)
    ct = write_ct_series(make_phantom(spec), tmp_path / "ct")
    node = analysing_node(make_node, PACSNODE__JOBS__LEASE_S="2")
    node.storescu(*ct.paths)
    wait_until(lambda: (a := node.study(ct.study_instance_uid)["series"][0]["analysis"])
               and a["status"] == "running", 60, "the job to start")
    node.kill()  # the node and, with it, its worker processes
    node.start()  # a new identity: the job is taken over once the dead one's lease ends
    analysis = wait_until(
        lambda: (a := node.study(ct.study_instance_uid)["series"][0]["analysis"])
        and a["status"] in ("done", "failed") and a, 120, "the job to run again")
    assert analysis["status"] == "done", analysis["reason"]
    assert analysis["attempt"] == 2
    assert "stopped renewing its lease; taking it over" in node.log()
