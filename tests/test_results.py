"""The result encoders (node/results.py): DICOM SEG and TID 1500 SR, checked by reading
them back with highdicom and by dciodvfy (dicom3tools)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000Lossless, RLELossless

from analysis.phantoms.dicom_series import ct_series_datasets
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    PhantomSpec,
    make_phantom,
)
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, SegmentMeasurement
from node import __version__
from node.results import (
    DEFAULT_STRUCTURES,
    AlgorithmFamily,
    AlgorithmInfo,
    EncoderIdentity,
    RegionFinding,
    UnknownStructureError,
    build_measurement_report,
    build_segmentation,
    prepare_sources,
)
from node.results.sr import DICE_VS_CLASSICAL, PROBABILITY, TARGET_REGION
from tests.conftest import SHARED_DATA, require_tool, save_instance

ALGORITHM = AlgorithmInfo(
    name="Lung threshold", version="1.2.3", family=AlgorithmFamily.HISTOGRAM_ANALYSIS,
    parameters={"threshold_hu": "-500"},
)
IDENTITY = EncoderIdentity(ae_title="PACSNODE", device_serial_number="SN-42")
TYPE2 = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
         "AccessionNumber", "StudyDate", "StudyTime")
EXPECTED_TYPE = {BODY: "38266002", LUNG_LEFT: "44029006", LUNG_RIGHT: "3341006"}
EXPECTED_LABEL = {BODY: "Body", LUNG_LEFT: "Left lung", LUNG_RIGHT: "Right lung"}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def dciodvfy_clean(path: Path) -> list[str]:
    """Run dciodvfy; fail on any error line, return (and print) the warnings."""
    require_tool("dciodvfy")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    for line in warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    return warnings


def code_of(item: Dataset, keyword: str) -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def measurements_for(masks: dict[str, np.ndarray]) -> list[SegmentMeasurement]:
    """Distinct, recognisable values per segment (the encoder does not compute them)."""
    out = []
    for index, (label, mask) in enumerate(masks.items()):
        voxels = int(mask.sum())
        out.append(SegmentMeasurement(
            label=label, voxels=voxels, volume_ml=round(voxels * 0.01 + index, 3),
            mean_hu=-850.5 + 100 * index, std_hu=12.25 + index,
            surface_area_mm2=1500.0 + 10 * index, max_diameter_mm=180.5 + index,
        ))
    return out


def build_and_write(
    tmp_path: Path, sources: Sequence[Dataset], masks: dict[str, np.ndarray]
) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR, Path, Path]:
    seg = build_segmentation(sources, masks, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=901, series_description="pacsnode lungs",
                             instance_number=3)
    sr = build_measurement_report(seg, sources, measurements_for(masks), algorithm=ALGORITHM,
                                  identity=IDENTITY, series_number=902,
                                  series_description="pacsnode lung measurements")
    seg_path = save_instance(seg, tmp_path / "seg.dcm")
    sr_path = save_instance(sr, tmp_path / "sr.dcm")
    return seg, sr, seg_path, sr_path


@pytest.fixture(scope="module")
def phantom_series() -> tuple[list[Dataset], dict[str, np.ndarray]]:
    """12 slices of 64x64 with body and both lungs, in volume order, and their masks."""
    phantom = make_phantom(PhantomSpec(slices=12, rows=64, columns=64, pixel_spacing_mm=6.0))
    datasets = ct_series_datasets(phantom)
    labels = phantom.labels
    masks = {BODY: labels > 0, LUNG_LEFT: labels == LABEL_LUNG_LEFT,
             LUNG_RIGHT: labels == LABEL_LUNG_RIGHT}
    return datasets, masks


def fresh(series: tuple[list[Dataset], dict[str, np.ndarray]]) -> tuple[list[Dataset], dict]:
    datasets, masks = series
    return [copy.deepcopy(ds) for ds in datasets], dict(masks)


# ---------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------


def test_phantom_left_lung_is_on_the_patients_left(phantom_series) -> None:
    # Guards the test data: columns run towards +x, the patient's left in LPS.
    datasets, masks = phantom_series
    assert [float(v) for v in datasets[0].ImageOrientationPatient[:3]] == [1, 0, 0]
    left_columns = np.nonzero(masks[LUNG_LEFT])[2].mean()
    right_columns = np.nonzero(masks[LUNG_RIGHT])[2].mean()
    assert left_columns > 32 > right_columns


def test_segmentation_round_trip_with_shuffled_sources(tmp_path: Path, phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    order = np.random.default_rng(7).permutation(len(datasets))
    assert not np.array_equal(order, np.arange(len(datasets)))
    sources = [datasets[i] for i in order]
    shuffled = {label: mask[order] for label, mask in masks.items()}

    seg = build_segmentation(sources, shuffled, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=901, series_description="pacsnode lungs",
                             instance_number=3)
    path = save_instance(seg, tmp_path / "seg.dcm")
    back = hd.seg.segread(path)

    # Identity of the new instance and what it copies from the sources.
    src = datasets[0]
    assert back.Modality == "SEG"
    assert back.SegmentationType == "BINARY"
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.SeriesInstanceUID != src.SeriesInstanceUID
    assert back.SOPInstanceUID not in {ds.SOPInstanceUID for ds in datasets}
    assert (back.SeriesNumber, back.SeriesDescription, back.InstanceNumber) == (
        901, "pacsnode lungs", 3)
    assert (back.PatientID, str(back.PatientName)) == (src.PatientID, str(src.PatientName))
    assert back.AccessionNumber == src.AccessionNumber
    assert back.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (back.Manufacturer, back.ManufacturerModelName) == ("pacsnode", "pacsnode")
    assert back.SoftwareVersions == __version__
    assert back.DeviceSerialNumber == "SN-42"

    # Segments: in mask order, numbered from 1, coded.
    items = list(back.SegmentSequence)
    assert [int(s.SegmentNumber) for s in items] == [1, 2, 3]
    assert [s.SegmentLabel for s in items] == ["Body", "Left lung", "Right lung"]
    for item, label in zip(items, [BODY, LUNG_LEFT, LUNG_RIGHT], strict=True):
        assert code_of(item, "SegmentedPropertyCategoryCodeSequence") == ("91723000", "SCT")
        assert code_of(item, "SegmentedPropertyTypeCodeSequence") == (EXPECTED_TYPE[label], "SCT")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("Lung threshold", "1.2.3")
        assert code_of(algo, "AlgorithmFamilyCodeSequence") == ("123105", "DCM")
        assert "threshold_hu=-500" in algo.AlgorithmParameters
        assert item.TrackingID == EXPECTED_LABEL[label]
        assert item.TrackingUID

    # Every source referenced, and every segment has a frame for every source.
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert {r.ReferencedSOPInstanceUID for r in back.SourceImageSequence} == set(uids)
    (series,) = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence} == set(uids)
    assert back.NumberOfFrames == 3 * len(datasets)

    # Voxel for voxel, by source instance, in the original (unshuffled) order.
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
    assert pixels.shape == (len(datasets), 64, 64, 3)
    for index, label in enumerate([BODY, LUNG_LEFT, LUNG_RIGHT]):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), masks[label])

    # Independently of highdicom's reader: each frame sits at the position of the
    # source it derives from, and holds that source's mask.
    by_uid = {str(ds.SOPInstanceUID): k for k, ds in enumerate(datasets)}
    frames = back.pixel_array
    seen = set()
    for frame, item in zip(frames, back.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = by_uid[uid]
        seen.add((uid, number))
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in datasets[k].ImagePositionPatient])
        label = [BODY, LUNG_LEFT, LUNG_RIGHT][number - 1]
        np.testing.assert_array_equal(frame.astype(bool), masks[label][k])
    assert len(seen) == 3 * len(datasets)
    dciodvfy_clean(path)  # last, so that the checks above run without dicom3tools


def test_segmentation_in_jpeg2000_lossless(tmp_path: Path, phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    seg = build_segmentation(datasets, masks, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=5, series_description="x",
                             transfer_syntax_uid=JPEG2000Lossless)
    path = save_instance(seg, tmp_path / "seg.dcm")
    back = hd.seg.segread(path)
    assert back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
    for index, label in enumerate([BODY, LUNG_LEFT, LUNG_RIGHT]):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), masks[label])
    with pytest.raises(ValueError, match="transfer_syntax_uid"):
        build_segmentation(datasets, masks, algorithm=ALGORITHM, identity=IDENTITY,
                           series_number=5, series_description="x",
                           transfer_syntax_uid=RLELossless)
    dciodvfy_clean(path)


def test_empty_masks_are_left_out_and_all_empty_is_an_error(phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    masks[LUNG_LEFT] = np.zeros_like(masks[LUNG_LEFT])
    masks[LUNG_RIGHT] = masks[LUNG_RIGHT].copy()
    masks[LUNG_RIGHT][:4] = False  # slices without the segment still get a frame
    seg = build_segmentation(datasets, masks, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=5, series_description="x")
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [
        (1, "Body"), (2, "Right lung")]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert seg.NumberOfFrames == 2 * len(datasets)
    right_lung_sources = {
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in seg.PerFrameFunctionalGroupsSequence
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 2
    }
    assert right_lung_sources == set(uids)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[2])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks[LUNG_RIGHT])

    empty = {label: np.zeros_like(mask) for label, mask in masks.items()}
    with pytest.raises(ValueError, match="every mask is empty"):
        build_segmentation(datasets, empty, algorithm=ALGORITHM, identity=IDENTITY,
                           series_number=5, series_description="x")


def test_segmentation_refuses_bad_input(phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    kwargs = dict(algorithm=ALGORITHM, identity=IDENTITY, series_number=5,
                  series_description="x")
    with pytest.raises(UnknownStructureError, match="'liver'"):
        build_segmentation(datasets, {"liver": masks[BODY]}, **kwargs)
    with pytest.raises(ValueError, match=r"masks\['lung_left'\] has shape"):
        build_segmentation(datasets, {LUNG_LEFT: masks[LUNG_LEFT][1:]}, **kwargs)
    with pytest.raises(TypeError, match=r"masks\['body'\] must be a bool array"):
        build_segmentation(datasets, {BODY: masks[BODY].astype(np.uint8)}, **kwargs)
    with pytest.raises(ValueError, match="series_description"):
        build_segmentation(datasets, masks, **{**kwargs, "series_description": "x" * 65})
    with pytest.raises(ValueError, match="series_number"):
        build_segmentation(datasets, masks, **{**kwargs, "series_number": 0})
    with pytest.raises(ValueError, match="SOPInstanceUID more than once"):
        build_segmentation(datasets[:2] + datasets[:1], {BODY: masks[BODY][:3]}, **kwargs)


def test_structure_table_and_identity() -> None:
    assert DEFAULT_STRUCTURES[LUNG_RIGHT].display_label == "Right lung"
    with pytest.raises(UnknownStructureError, match="known labels: body, lung_left, lung_right"):
        DEFAULT_STRUCTURES["Lung_Left"]
    # The device UID is derived, so every restart of a node reports the same one.
    assert EncoderIdentity("PACSNODE").device_uid == EncoderIdentity("PACSNODE").device_uid
    assert EncoderIdentity("PACSNODE").device_uid != EncoderIdentity("OTHERNODE").device_uid
    assert EncoderIdentity("PACSNODE").device_serial_number == "PACSNODE"
    assert EncoderIdentity.for_node("PACSNODE") == EncoderIdentity("PACSNODE")
    assert EncoderIdentity("PACSNODE").software_version == __version__
    with pytest.raises(ValueError, match="ae_title"):
        EncoderIdentity("A" * 17)
    with pytest.raises(ValueError, match="AlgorithmInfo.version"):
        AlgorithmInfo(name="x", version="")
    assert ALGORITHM.to_sequence()[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123105"


def test_sources_missing_type2_attributes(tmp_path: Path, phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    for ds in datasets:
        for keyword in TYPE2:
            delattr(ds, keyword)
        ds.SpecificCharacterSet = ""  # as some GE scanners send it
    datasets[0].PatientSex = "X"  # not an enumerated value
    datasets[0].private_block(0x0009, "PACSNODE TEST", create=True).add_new(0x01, "LO", "x")
    before = [ds.to_json_dict() for ds in datasets]

    prepared = prepare_sources(datasets)
    assert all(getattr(p, keyword) == "" for p in prepared for keyword in TYPE2)
    assert all("PixelData" not in p and "SpecificCharacterSet" not in p for p in prepared)
    assert not any(elem.tag.is_private for elem in prepared[0])
    assert prepared[0].PatientSex == "" and datasets[0].PatientSex == "X"
    assert [str(p.SOPInstanceUID) for p in prepared] == [str(d.SOPInstanceUID) for d in datasets]

    seg, sr, seg_path, sr_path = build_and_write(tmp_path, datasets, masks)
    # The caller's datasets are untouched.
    assert [ds.to_json_dict() for ds in datasets] == before
    dciodvfy_clean(seg_path)
    dciodvfy_clean(sr_path)
    assert dcmread(seg_path).PatientBirthDate == ""


# ---------------------------------------------------------------------------------------
# Measurement report
# ---------------------------------------------------------------------------------------


def read_groups(path: Path) -> tuple[hd.sr.Comprehensive3DSR, list]:
    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr, sr.content.get_volumetric_roi_measurement_groups()


def measured(group) -> dict[tuple[str, str | None], tuple[float, str]]:
    """(name code, derivation code) -> (value, unit code) of a group's measurements."""
    out = {}
    for m in group.get_measurements():
        derivation = m.derivation.value if m.derivation is not None else None
        out[(m.name.value, derivation)] = (m.value, m.unit.value)
    return out


def test_measurement_report(tmp_path: Path, phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    seg, sr, seg_path, sr_path = build_and_write(tmp_path, datasets, masks)
    back, groups = read_groups(sr_path)
    src = datasets[0]

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.SeriesInstanceUID not in {src.SeriesInstanceUID, seg.SeriesInstanceUID}
    assert (back.SeriesNumber, back.SeriesDescription) == (902, "pacsnode lung measurements")
    assert back.PatientID == src.PatientID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {r.ReferencedSOPInstanceUID
                for s in back.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, *(str(ds.SOPInstanceUID) for ds in datasets)}

    (observer,) = back.content.get_observer_contexts()
    assert observer.observer_type == codes.cid270.Device
    device = observer.observer_identifying_attributes
    assert (device.uid, device.name, device.serial_number) == (IDENTITY.device_uid, "PACSNODE",
                                                               "SN-42")
    assert (device.manufacturer_name, device.model_name) == ("pacsnode", "pacsnode")
    procedure = [item for item in back.ContentSequence
                 if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [code_of(p, "ConceptCodeSequence") for p in procedure] == [("77477000", "SCT")]

    seg_items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    expected = measurements_for(masks)
    assert len(groups) == 3
    for number, (group, m) in enumerate(zip(groups, expected, strict=True), start=1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        assert ref.referenced_segment_numbers == [number]
        assert ref.source_series_for_segmentation.value == src.SeriesInstanceUID
        assert group.tracking_uid == seg_items[number].TrackingUID
        assert group.tracking_identifier == EXPECTED_LABEL[m.label]
        assert group.finding_type.value == EXPECTED_TYPE[m.label]
        (site,) = group.finding_sites
        assert site.value == (codes.SCT.EntireBody if m.label == BODY else codes.SCT.Lung)
        expected_laterality = {BODY: None, LUNG_LEFT: "7771000", LUNG_RIGHT: "24028007"}
        assert (site.laterality.value if site.laterality else None) == expected_laterality[m.label]
        assert measured(group) == {
            ("118565006", None): (pytest.approx(m.volume_ml), "mL"),
            ("112031", "373098007"): (pytest.approx(m.mean_hu), "[hnsf'U]"),
            ("112031", "386136009"): (pytest.approx(m.std_hu), "[hnsf'U]"),
            ("C0JK", None): (pytest.approx(m.surface_area_mm2), "mm2"),
            ("81827009", "56851009"): (pytest.approx(m.max_diameter_mm), "mm"),
        }
        for item in group.get_measurements():
            texts = {c.ConceptNameCodeSequence[0].CodeMeaning: c.TextValue
                     for c in item[0].ContentSequence if c.ValueType == "TEXT"}
            assert texts["Algorithm Name"] == "Lung threshold"
            assert texts["Algorithm Version"] == "1.2.3"
    dciodvfy_clean(seg_path)
    dciodvfy_clean(sr_path)


def test_single_segment_report(tmp_path: Path, phantom_series) -> None:
    # One non-empty mask: the SEG's segment identification sits in the shared
    # functional groups, where ReferencedSegment.from_segmentation cannot find it.
    datasets, masks = fresh(phantom_series)
    masks[BODY] = np.zeros_like(masks[BODY])
    masks[LUNG_RIGHT] = np.zeros_like(masks[LUNG_RIGHT])
    seg, sr, seg_path, sr_path = build_and_write(tmp_path, datasets, masks)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Left lung"]
    _, groups = read_groups(sr_path)
    assert len(groups) == 1  # the empty structures have no segment and no group
    ref = groups[0].referenced_segment
    assert (ref.referenced_sop_instance_uid, ref.referenced_segment_numbers) == (
        seg.SOPInstanceUID, [1])
    assert groups[0].finding_type.value == "44029006"
    dciodvfy_clean(seg_path)
    dciodvfy_clean(sr_path)


def test_report_qualitative_evaluations(tmp_path: Path, phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    seg = build_segmentation(datasets, masks, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=5, series_description="x")
    evaluation = hd.sr.QualitativeEvaluation(codes.SCT.Severity, codes.SCT.Absent)
    sr = build_measurement_report(seg, datasets, measurements_for(masks), algorithm=ALGORITHM,
                                  identity=IDENTITY, series_number=6, series_description="y",
                                  qualitative={LUNG_RIGHT: [evaluation]})
    _, groups = read_groups(save_instance(sr, tmp_path / "sr.dcm"))
    assert [len(g.get_qualitative_evaluations()) for g in groups] == [0, 0, 1]
    assert groups[2].get_qualitative_evaluations()[0].value == codes.SCT.Absent


def test_report_agreement_and_region(tmp_path: Path, phantom_series) -> None:
    require_tool("dciodvfy")
    datasets, masks = fresh(phantom_series)
    seg = build_segmentation(datasets, masks, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=5, series_description="x")
    classifier = AlgorithmInfo(name="pacsnode region", version="1.0",
                               family=AlgorithmFamily.CLUSTER_ANALYSIS)
    sr = build_measurement_report(
        seg, datasets, measurements_for(masks), algorithm=ALGORITHM, identity=IDENTITY,
        series_number=6, series_description="y", agreement={LUNG_LEFT: 0.93, LUNG_RIGHT: 0.91},
        region=RegionFinding("chest", 0.87), region_algorithm=classifier)
    path = save_instance(sr, tmp_path / "sr.dcm")
    # Only the private coding scheme is unknown to dciodvfy (declared in the SR's
    # Coding Scheme Identification Sequence, as PS3.3 C.12.1.1.2.1 asks).
    assert all("99PACSNODE" in line for line in dciodvfy_clean(path))
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PACSNODE"
    sr, groups = read_groups(path)
    dice = [measured(g).get((DICE_VS_CLASSICAL.value, None)) for g in groups]
    assert dice == [None, (0.93, "1"), (0.91, "1")]
    items = hd.sr.utils.find_content_items(sr, name=TARGET_REGION, recursive=True)
    assert [i.ConceptCodeSequence[0].CodeValue for i in items] == ["816094009"]
    probability = hd.sr.utils.find_content_items(sr, name=PROBABILITY, recursive=True)
    assert float(probability[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.87)
    with pytest.raises(ValueError, match="region label must be one of"):
        RegionFinding("knee", 0.9)
    with pytest.raises(ValueError, match="Dice coefficient"):
        build_measurement_report(seg, datasets, measurements_for(masks), algorithm=ALGORITHM,
                                 identity=IDENTITY, series_number=6, series_description="y",
                                 agreement={LUNG_LEFT: 1.5})


def test_report_refuses_inconsistent_measurements(phantom_series) -> None:
    datasets, masks = fresh(phantom_series)
    only_body = {BODY: masks[BODY]}
    seg = build_segmentation(datasets, only_body, algorithm=ALGORITHM, identity=IDENTITY,
                             series_number=5, series_description="x")
    kwargs = dict(algorithm=ALGORITHM, identity=IDENTITY, series_number=6,
                  series_description="y")
    body, left, _ = measurements_for(masks)
    with pytest.raises(ValueError, match="'lung_left' has no segment 'Left lung'"):
        build_measurement_report(seg, datasets, [body, left], **kwargs)
    nan = SegmentMeasurement(**{**body.__dict__, "mean_hu": float("nan")})
    with pytest.raises(ValueError, match="mean_hu is nan"):
        build_measurement_report(seg, datasets, [nan], **kwargs)
    with pytest.raises(ValueError, match="more than once"):
        build_measurement_report(seg, datasets, [body, body], **kwargs)
    other = [copy.deepcopy(ds) for ds in datasets]
    for ds in other:
        ds.StudyInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_measurement_report(seg, other, [body], **kwargs)
    extra = copy.deepcopy(datasets[0])
    extra.SOPInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="does not reference 1 of the sources"):
        build_measurement_report(seg, [*datasets, extra], [body], **kwargs)
    with pytest.raises(ValueError, match="without a measurement group"):
        build_measurement_report(seg, datasets, [body], qualitative={LUNG_LEFT: []}, **kwargs)


# ---------------------------------------------------------------------------------------
# Real scanner data
# ---------------------------------------------------------------------------------------

real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                               reason=f"real data folder {SHARED_DATA} is absent")


def real_masks(datasets: Sequence[Dataset]) -> dict[str, np.ndarray]:
    """Threshold masks: whatever is denser than air, and air-like regions on each side."""
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in datasets])
    columns = np.arange(hu.shape[2])[None, None, :]
    low = (hu > -950) & (hu < -400)
    return {
        BODY: hu > -400,
        # Column order is enough to put the masks on opposite sides; their content
        # does not matter to the encoder.
        LUNG_LEFT: low & (columns >= hu.shape[2] // 2),
        LUNG_RIGHT: low & (columns < hu.shape[2] // 2),
    }


def header_json(ds: Dataset) -> dict:
    return ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda e: "bulk")


def real_series(name: str) -> list[Dataset]:
    folder = SHARED_DATA / name
    if name == "ct-phantom-tilted":
        paths = sorted(folder.glob("I*.dcm"), key=lambda p: int(p.stem[1:]))[20:30]
    else:
        paths = sorted(p for p in folder.glob("*.dcm") if "seg" not in p.name)
    return [dcmread(p) for p in paths]


@real_data
@pytest.mark.parametrize("name", ["ct-phantom-tilted", "ct-chest-slice", "ct-liver-3slice"])
def test_real_data(tmp_path: Path, name: str) -> None:
    datasets = real_series(name)
    masks = {label: mask for label, mask in real_masks(datasets).items() if mask.any()}
    assert masks, "the thresholds found nothing to encode"
    before = [header_json(ds) for ds in datasets]
    seg, sr, seg_path, sr_path = build_and_write(tmp_path, datasets, masks)
    assert [header_json(ds) for ds in datasets] == before

    back = hd.seg.segread(seg_path)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert {r.ReferencedSOPInstanceUID for r in back.SourceImageSequence} == set(uids)
    assert back.StudyInstanceUID == datasets[0].StudyInstanceUID
    numbers = [int(s.SegmentNumber) for s in back.SegmentSequence]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=numbers)
    for index, mask in enumerate(masks.values()):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), mask)
    # Geometry as in the sources, including the tilted planes.
    orientation = back.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == pytest.approx(
        [float(v) for v in datasets[0].ImageOrientationPatient])
    _, groups = read_groups(sr_path)
    assert len(groups) == len(masks)
    dciodvfy_clean(seg_path)
    dciodvfy_clean(sr_path)
