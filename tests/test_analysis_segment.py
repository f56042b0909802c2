"""analysis.segment on phantoms (against their labels) and on real CT slices."""

from __future__ import annotations

import dataclasses
import glob

import numpy as np
import pydicom
import pytest

from analysis import segment
from analysis.filters import median_filter
from analysis.phantoms.trunk import (
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    Phantom,
    PhantomSpec,
    make_phantom,
)
from analysis.pipeline import get_pipeline
from analysis.volume import volume_from_datasets
from tests.conftest import SHARED_DATA

BASE = PhantomSpec()  # 40 x 256 x 256, 1.5 mm pixels, 2.5 mm slices


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def affine_of(spec: PhantomSpec, flip_columns: bool = False) -> np.ndarray:
    """Head-first supine axial: columns to the patient's left (+x), rows to the back."""
    ps, st = spec.pixel_spacing_mm, spec.slice_thickness_mm
    affine = np.array([[0, 0, ps, 0], [0, ps, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1.0]])
    if flip_columns:
        affine[0, 2] = -ps
        affine[0, 3] = (spec.columns - 1) * ps
    return affine


def segment_phantom(
    phantom: Phantom, affine: np.ndarray | None = None, hu: np.ndarray | None = None
):
    spec = phantom.spec
    spacing = (spec.slice_thickness_mm, spec.pixel_spacing_mm, spec.pixel_spacing_mm)
    work = median_filter(phantom.hu if hu is None else hu, 3)
    body = segment.segment_body(work, spacing)
    affine = affine_of(spec) if affine is None else affine
    left, right = segment.segment_lungs(work, body, spacing, affine)
    return body, left, right


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return make_phantom(BASE)


@pytest.fixture(scope="module")
def healthy_result(healthy):
    return segment_phantom(healthy)


def test_body_matches_the_phantom_and_leaves_the_table_out(healthy, healthy_result):
    body, _, _ = healthy_result
    assert dice(body, healthy.labels > 0) > 0.95
    table = healthy.hu > 100
    table[:, : BASE.rows // 2] = False  # only the posterior half: the table, and the spine
    table &= healthy.labels == 0
    assert table.sum() > 1000 and not (body & table).any()


def test_lungs_match_the_phantom(healthy, healthy_result):
    _, left, right = healthy_result
    assert dice(left, healthy.labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, healthy.labels == LABEL_LUNG_RIGHT) > 0.9


def test_vessels_inside_the_lungs_are_included(healthy, healthy_result):
    _, left, right = healthy_result
    vessels = (healthy.labels >= LABEL_LUNG_LEFT) & (healthy.hu > -300)
    assert vessels.sum() > 500
    assert (vessels & (left | right)).sum() / vessels.sum() > 0.95


def test_left_and_right_come_from_the_affine_not_the_image_side(healthy):
    """The same pixels with columns declared to run to the patient's right swap sides."""
    _, left, right = segment_phantom(healthy, affine_of(BASE, flip_columns=True))
    assert dice(left, healthy.labels == LABEL_LUNG_RIGHT) > 0.9
    assert dice(right, healthy.labels == LABEL_LUNG_LEFT) > 0.9


def test_mirrored_image_with_mirrored_affine_keeps_the_sides(healthy):
    labels = healthy.labels[:, :, ::-1]
    mirrored = dataclasses.replace(healthy, hu=np.ascontiguousarray(healthy.hu[:, :, ::-1]))
    _, left, right = segment_phantom(mirrored, affine_of(BASE, flip_columns=True))
    assert dice(left, labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, labels == LABEL_LUNG_RIGHT) > 0.9


def test_abdomen_without_lungs_has_no_lungs_despite_stomach_and_bowel_gas():
    abdomen = make_phantom(dataclasses.replace(BASE, lungs=False, stomach_gas=True, bowel_gas=True))
    gas = (abdomen.hu < -800) & (abdomen.labels > 0)
    assert gas.sum() > 0.015 * (abdomen.labels > 0).sum()  # big enough to pass as lung by size
    body, left, right = segment_phantom(abdomen)
    assert dice(body, abdomen.labels > 0) > 0.95
    assert not left.any() and not right.any()


def test_gas_beside_the_lung_bases_is_not_lung(healthy):
    spec = dataclasses.replace(BASE, stomach_gas=True, bowel_gas=True)
    gassy = make_phantom(spec)
    gas = (gassy.labels == 1) & (np.abs(gassy.hu - healthy.hu) > 300)
    lung_bases = slice(int(0.6 * BASE.slices), None)
    gas_slices = gas[lung_bases].any(axis=(1, 2))
    lung_slices = (gassy.labels[lung_bases] >= LABEL_LUNG_LEFT).any(axis=(1, 2))
    assert (gas_slices & lung_slices).sum() >= 5  # gas and lung bases share slices
    _, left, right = segment_phantom(gassy)
    assert not (gas & (left | right)).any()
    assert dice(left, gassy.labels == LABEL_LUNG_LEFT) > 0.9


def test_trachea_joining_both_lungs_is_cut_away_and_sides_still_split():
    airway = make_phantom(dataclasses.replace(BASE, trachea=True))
    trachea = (airway.labels == 1) & (airway.hu < -800)
    assert trachea.sum() > 500
    _, left, right = segment_phantom(airway)
    assert (trachea & (left | right)).sum() < 0.25 * trachea.sum()
    assert dice(left, airway.labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, airway.labels == LABEL_LUNG_RIGHT) > 0.9


def test_touching_lungs_are_split_at_the_midline(healthy):
    hu, labels = healthy.hu.copy(), healthy.labels.copy()
    centred = (np.arange(n) - n / 2 + 0.5 for n in (BASE.rows, BASE.columns))
    y, x = np.meshgrid(*centred, indexing="ij")
    bridge = (np.abs(y * 1.5 + 50) < 10) & (np.abs(x * 1.5) < 60)  # an anterior junction
    for k in range(5, 25):
        joined = bridge & (labels[k] == 1)
        hu[k][joined] = -850.0
        labels[k][joined & (x < 0)] = LABEL_LUNG_RIGHT
        labels[k][joined & (x >= 0)] = LABEL_LUNG_LEFT
    _, left, right = segment_phantom(healthy, hu=hu)
    assert dice(left, labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, labels == LABEL_LUNG_RIGHT) > 0.9
    assert not left[..., : BASE.columns // 2 - 10].any()
    assert not right[..., BASE.columns // 2 + 10 :].any()


@pytest.mark.parametrize("disease", ["consolidation", "ground_glass"])
def test_dense_lung_against_the_pleura_is_included(healthy, disease):
    sick = make_phantom(dataclasses.replace(BASE, **{disease: True}))
    patch = (sick.labels >= LABEL_LUNG_LEFT) & (np.abs(sick.hu - healthy.hu) > 200)
    assert patch.sum() > 2000
    _, left, right = segment_phantom(sick)
    assert (patch & (left | right)).sum() / patch.sum() > 0.7
    assert dice(left, sick.labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, sick.labels == LABEL_LUNG_RIGHT) > 0.9


def test_arms_belong_to_the_body():
    spec = dataclasses.replace(BASE, slices=12, columns=360, arms=True)
    armed = make_phantom(spec)
    arms = (armed.labels > 0) & (np.abs(np.arange(spec.columns) - spec.columns / 2) * 1.5 > 180)
    assert arms.sum() > 1000
    body, _, _ = segment_phantom(armed)
    assert dice(body, armed.labels > 0) > 0.95
    assert (body & arms).sum() / arms.sum() > 0.95


@pytest.mark.parametrize(
    "spec",
    [
        PhantomSpec(slices=8, rows=64, columns=64, pixel_spacing_mm=6.25),
        PhantomSpec(slices=12, rows=48, columns=48, pixel_spacing_mm=8.0),
        PhantomSpec(slices=1),
    ],
    ids=["64px", "48px-coarse", "one-slice"],
)
def test_tiny_and_single_slice_phantoms(spec):
    phantom = make_phantom(spec)
    body, left, right = segment_phantom(phantom)
    assert dice(body, phantom.labels > 0) > 0.95
    assert dice(left, phantom.labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, phantom.labels == LABEL_LUNG_RIGHT) > 0.9


def test_empty_volume_gives_empty_masks():
    air = np.full((3, 32, 32), -1000.0, dtype=np.float32)
    body = segment.segment_body(air, (2.5, 1.5, 1.5))
    assert not body.any()
    left, right = segment.segment_lungs(air, body, (2.5, 1.5, 1.5), np.eye(4))
    assert not left.any() and not right.any() and left.shape == air.shape


def test_fill_holes_is_per_slice():
    ring = np.zeros((3, 9, 9), dtype=bool)
    ring[1, 2:7, 2:7] = True
    ring[1, 3:6, 3:6] = False
    cup = ring.copy()
    cup[1, 3:6, 6] = False  # opened on one side: not a hole
    filled = segment.fill_holes_slicewise(np.concatenate([ring, cup]))
    assert filled[1, 4, 4] and filled[1, 3:6, 3:6].all()
    assert not filled[4, 4, 4]
    assert not filled[0].any() and not filled[2].any()


# --------------------------------------------------------------------------- k-means


def test_kmeans_separates_classes_darkest_first():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-850, 20, 5000), rng.normal(40, 20, 5000)])
    values = values.astype(np.float32)
    labels, centres = segment.kmeans_segment(values, 2)
    np.testing.assert_allclose(centres, [-850, 40], atol=5)
    assert (labels[:5000] == 0).mean() > 0.99 and (labels[5000:] == 1).mean() > 0.99
    again, _ = segment.kmeans_segment(values, 2)
    np.testing.assert_array_equal(labels, again)


def test_kmeans_trains_only_inside_the_mask():
    values = np.array([-1000.0] * 50 + [0.0] * 50 + [1000.0] * 50, dtype=np.float32)
    mask = values > -500
    labels, centres = segment.kmeans_segment(values, 2, mask=mask)
    np.testing.assert_allclose(centres, [0, 1000])
    assert labels[0] == 0 and labels[-1] == 1
    with pytest.raises(ValueError, match="k must be"):
        segment.kmeans_segment(values, 1)


def test_kmeans_air_threshold_drives_the_lung_segmentation(healthy):
    spacing = (BASE.slice_thickness_mm, BASE.pixel_spacing_mm, BASE.pixel_spacing_mm)
    work = median_filter(healthy.hu, 3)
    body = segment.segment_body(work, spacing)
    threshold = segment.kmeans_air_threshold(work, body)
    assert -600 <= threshold <= -300
    left, right = segment.segment_lungs(
        work, body, spacing, affine_of(BASE), air_threshold_hu=threshold
    )
    assert dice(left, healthy.labels == LABEL_LUNG_LEFT) > 0.9
    assert dice(right, healthy.labels == LABEL_LUNG_RIGHT) > 0.9


# ----------------------------------------------------------------- real scanner data


def run_real(name: str):
    files = sorted(glob.glob(str(SHARED_DATA / name / "*.dcm")))
    if not files:
        pytest.skip(f"shared data not available: {SHARED_DATA / name}")
    datasets = [
        ds
        for ds in map(pydicom.dcmread, files)
        if ds.get("Modality") == "CT" and int(ds.get("NumberOfFrames", 1) or 1) == 1
    ]
    volume, _ = volume_from_datasets(datasets)
    return volume, get_pipeline("ct-body-lungs-classical").run(volume)


def centroid_x(volume, mask: np.ndarray) -> float:
    return float((volume.affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[0])


@pytest.mark.parametrize("name", ["ct-chest-slice", "ct-liver-3slice"])
def test_real_lungs_found_on_the_correct_sides(name):
    volume, result = run_real(name)
    left, right, body = result.masks["lung_left"], result.masks["lung_right"], result.masks["body"]
    pixel_cm2 = volume.spacing_mm[1] * volume.spacing_mm[2] / 100
    for lung in (left, right):
        area = lung.sum(axis=(1, 2)).max() * pixel_cm2
        assert 30 < area < 200  # cm2 on the slice where it is largest
        assert volume.hu[lung].mean() < -600
        assert (lung & ~body).sum() == 0
    assert centroid_x(volume, left) > centroid_x(volume, body) > centroid_x(volume, right)


def test_real_head_phantom_has_no_lungs():
    _, result = run_real("ct-phantom-tilted")
    assert result.masks["body"].any()
    assert not result.masks["lung_left"].any() and not result.masks["lung_right"].any()
