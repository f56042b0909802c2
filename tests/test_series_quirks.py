"""Series as real scanners and anonymizers send them, through the whole analysis: a
sequential protocol whose slice spacing changes, and a FrameOfReferenceUID per slice.
Each gives one SEG over every source frame and an SR that says what was done
(checked by dciodvfy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from analysis.phantoms.dicom_series import ct_series_datasets
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from node.config import Settings
from node.workflow.analyze import SeriesOutcome, analyze_series, dataset_bytes
from tests.test_results import dciodvfy_clean

SPEC = PhantomSpec(slices=30, rows=128, columns=128, pixel_spacing_mm=3.0,
                   slice_thickness_mm=2.5, seed=4)


@pytest.fixture(scope="module")
def chest() -> list[Dataset]:
    return ct_series_datasets(make_phantom(SPEC))


def notes_of(sr: Dataset) -> list[str]:
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    assert container.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    return [str(item.TextValue) for item in container.ContentSequence
            if item.ValueType == "TEXT"]


def referenced_sources(seg: Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID)
            for frame in seg.PerFrameFunctionalGroupsSequence
            for derivation in frame.DerivationImageSequence
            for source in derivation.SourceImageSequence
            for ref in [source]}


def check_outputs(outcome: SeriesOutcome, tmp_path: Path) -> None:
    for kind, ds in (("seg", outcome.seg), ("sr", outcome.sr)):
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(dataset_bytes(ds))
        dciodvfy_clean(path)


def test_a_sequential_protocol_gives_one_seg_over_all_its_frames(chest: list[Dataset],
                                                                 tmp_path: Path) -> None:
    uneven = chest[:12] + chest[13::2]  # 12 slices of 2.5 mm, then 9 of 5 mm
    outcome = analyze_series(uneven, "ct-body-lungs", Settings())
    assert outcome.status == "done"
    assert referenced_sources(outcome.seg) == {str(ds.SOPInstanceUID) for ds in uneven}
    (note, *_) = notes_of(outcome.sr)
    assert note.startswith("slice spacing varies along the series: analysed in 2 blocks")
    # Pooled over the blocks, each with its own slice spacing: the lung volumes match
    # the same phantom analysed as one regular stack (every slice, 2.5 mm).
    whole = analyze_series(chest, "ct-body-lungs", Settings())
    by_label = {m.label: m for m in outcome.result.measurements}
    for m in whole.result.measurements:
        assert by_label[m.label].volume_ml == pytest.approx(m.volume_ml, rel=0.08), m.label
        assert by_label[m.label].mean_hu == pytest.approx(m.mean_hu, abs=25), m.label
    assert set(outcome.result.agreement) == {"body", "lung_left", "lung_right"}
    assert outcome.preview is not None
    check_outputs(outcome, tmp_path)


def test_a_frame_of_reference_per_slice_is_analysed_with_a_note(chest: list[Dataset],
                                                                tmp_path: Path) -> None:
    anonymized = [Dataset(dict(ds.items())) for ds in chest[:10]]
    for ds in anonymized:
        ds[0x00200052] = pydicom.DataElement(0x00200052, "UI", pydicom.uid.generate_uid())
    outcome = analyze_series(anonymized, "ct-body-lungs", Settings())
    assert outcome.status == "done"
    assert any("10 different FrameOfReferenceUIDs in 10 images" in n
               for n in notes_of(outcome.sr))
    # The SEG declares one frame of reference: that of one of its source slices.
    assert outcome.seg.FrameOfReferenceUID in {ds.FrameOfReferenceUID for ds in anonymized}
    assert referenced_sources(outcome.seg) == {str(ds.SOPInstanceUID) for ds in anonymized}
    masks = outcome.result.masks
    assert all(np.any(masks[label]) for label in ("body", "lung_left", "lung_right"))
    check_outputs(outcome, tmp_path)
