"""Anatomy as a guard on the lung masks (analysis/anatomy.py): pieces at the skin or of
bare gas are dropped, pieces on the wrong side move to the other lung, each with a note;
and left and right follow the patient in mirrored and prone series."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset

from analysis import pipeline as pl
from analysis.anatomy import guard_lungs
from analysis.phantoms.dicom_series import ct_series_datasets
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume
from analysis.volume import volume_from_datasets

SPEC = PhantomSpec(slices=12, rows=160, columns=160, pixel_spacing_mm=2.5,
                   slice_thickness_mm=5.0, seed=7)


@pytest.fixture(scope="module")
def chest() -> tuple[ImageVolume, dict[str, np.ndarray]]:
    volume, _ = volume_from_datasets(ct_series_datasets(make_phantom(SPEC)))
    result = pl.get_pipeline("ct-body-lungs").run(volume)
    return volume, result.masks


def _guard(volume: ImageVolume, masks: dict[str, np.ndarray]):
    return guard_lungs(masks, volume.hu, volume.spacing_mm, volume.affine, [])


def patient_x(volume: ImageVolume, mask: np.ndarray) -> float:
    k, r, c = np.argwhere(mask).mean(axis=0)
    return float((volume.affine @ np.array([k, r, c, 1.0]))[0])


def test_the_pipelines_own_lungs_pass_unchanged(chest) -> None:
    volume, masks = chest
    guarded, notes = _guard(volume, masks)
    assert notes == []
    for label in (BODY, LUNG_LEFT, LUNG_RIGHT):
        np.testing.assert_array_equal(guarded[label], masks[label])


def _blob(shape: tuple[int, ...], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, columns = np.ogrid[:shape[1], :shape[2]]
    disc = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2
    blob = np.zeros(shape, dtype=bool)
    blob[4:8] = disc
    return blob


def test_air_at_the_skin_is_not_lung(chest) -> None:
    volume, masks = chest
    body = masks[BODY]
    # Just under the anterior skin, on the midline: where a false "lung" along the
    # abdominal wall sits.
    column = body.shape[2] // 2
    top = int(np.flatnonzero(body[6, :, column])[0])
    blob = _blob(body.shape, (top + 2, column), 2) & body
    assert blob.any() and not (blob & (masks[LUNG_RIGHT] | masks[LUNG_LEFT])).any()
    guarded, notes = _guard(volume, {**masks, LUNG_RIGHT: masks[LUNG_RIGHT] | blob})
    np.testing.assert_array_equal(guarded[LUNG_RIGHT], masks[LUNG_RIGHT])
    (note,) = notes
    assert note.startswith("lung_right: a piece of") and "of the skin" in note


def test_bare_gas_is_not_lung(chest) -> None:
    volume, masks = chest
    # A pocket of gas deep in the body, between the lungs (the mediastinum).
    lungs = masks[LUNG_LEFT] | masks[LUNG_RIGHT]
    centre = np.argwhere(masks[BODY][6]).mean(axis=0).astype(int)
    blob = _blob(lungs.shape, (int(centre[0]), int(centre[1])), 4)
    assert not (blob & lungs).any()
    hu = volume.hu.copy()
    hu[blob] = -1000.0
    gassy = ImageVolume(hu=hu, spacing_mm=volume.spacing_mm, affine=volume.affine)
    guarded, notes = _guard(gassy, {**masks, LUNG_LEFT: masks[LUNG_LEFT] | blob})
    np.testing.assert_array_equal(guarded[LUNG_LEFT], masks[LUNG_LEFT])
    assert len(notes) == 1 and "bare gas" in notes[0]


def test_a_piece_on_the_other_side_moves_to_its_lung(chest) -> None:
    volume, masks = chest
    right = masks[LUNG_RIGHT]
    guarded, notes = _guard(volume, {**masks, LUNG_LEFT: masks[LUNG_LEFT] | right,
                                     LUNG_RIGHT: np.zeros_like(right)})
    np.testing.assert_array_equal(guarded[LUNG_RIGHT], right)
    np.testing.assert_array_equal(guarded[LUNG_LEFT], masks[LUNG_LEFT])
    assert len(notes) == 1 and "lies on the patient's right: moved to lung_right" in notes[0]


def _restored(datasets: list[Dataset], flip_rows: bool, flip_columns: bool) -> list[Dataset]:
    """The same patient stored mirrored (columns reversed) or as a prone scan is read
    (rows and columns reversed), with orientation and position saying so."""
    out = []
    for ds in datasets:
        pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        spacing = float(ds.PixelSpacing[0])
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        row_cosine, column_cosine = [1, 0, 0], [0, 1, 0]
        if flip_columns:
            pixels, x, row_cosine = pixels[:, ::-1], x + (ds.Columns - 1) * spacing, [-1, 0, 0]
        if flip_rows:
            pixels, y, column_cosine = pixels[::-1], y + (ds.Rows - 1) * spacing, [0, -1, 0]
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.ImagePositionPatient = [x, y, z]
        ds.ImageOrientationPatient = row_cosine + column_cosine
        ds.PatientPosition = "HFP" if flip_rows else "HFS"
        out.append(ds)
    return out


@pytest.mark.parametrize("flip_rows, flip_columns", [(False, True), (True, True)],
                         ids=["mirrored", "prone"])
def test_left_and_right_follow_the_patient(flip_rows: bool, flip_columns: bool) -> None:
    datasets = _restored(ct_series_datasets(make_phantom(SPEC)), flip_rows, flip_columns)
    volume, _ = volume_from_datasets(datasets)
    result = pl.get_pipeline("ct-body-lungs").run(volume)
    # LPS: the patient's left is +x; the phantom is centred on x = 0.
    assert patient_x(volume, result.masks[LUNG_LEFT]) > 30
    assert patient_x(volume, result.masks[LUNG_RIGHT]) < -30
    for source in ("cnn", "classical"):
        assert patient_x(volume, result.candidates[source][LUNG_LEFT]) > 30, source


# ------------------------------------------------------------------ airways


def _with_trachea(volume: ImageVolume, masks: dict[str, np.ndarray]):
    """The chest phantom reaching above the apex, with a gas tube down the midline
    in front of the spine that splits into two main bronchi; lung masks include it."""
    hu, body = volume.hu.copy(), masks[BODY]
    s = hu.shape[0]
    top_first = volume.affine[2, 0] <= 0
    order = list(range(s)) if top_first else list(range(s))[::-1]
    lungs = {label: masks[label].copy() for label in (LUNG_LEFT, LUNG_RIGHT)}
    for k in order[:3]:  # above the apex: soft tissue, no lung
        for mask in lungs.values():
            hu[k][mask[k]] = 40.0
            mask[k] = False
    rows, columns = np.ogrid[:hu.shape[1], :hu.shape[2]]
    r0, c0 = (int(v) for v in np.argwhere(body[order[6]]).mean(axis=0))
    r0 -= 10  # anterior of the body's centre
    tube = np.zeros(hu.shape, dtype=bool)
    for i, k in enumerate(order[:9]):
        if i < 7:
            tube[k] = (rows - r0) ** 2 + (columns - c0) ** 2 <= 4 ** 2
        else:  # the two main bronchi
            for dc in (-6, 6):
                tube[k] |= (rows - r0) ** 2 + (columns - c0 - dc) ** 2 <= 3 ** 2
    tube &= body
    hu[tube] = -1000.0
    lungs[LUNG_RIGHT] |= tube & (columns < c0)
    lungs[LUNG_LEFT] |= tube & (columns >= c0)
    return (ImageVolume(hu=hu, spacing_mm=volume.spacing_mm, affine=volume.affine),
            {**masks, **lungs}, tube, lungs)


def test_the_trachea_and_main_bronchi_are_not_lung(chest) -> None:
    volume, masks = chest
    tubed, with_tube, tube, lungs = _with_trachea(volume, masks)
    guarded, notes = _guard(tubed, with_tube)
    assert any(n.startswith("airways removed from lung:") for n in notes), notes
    for label in (LUNG_LEFT, LUNG_RIGHT):
        assert not (guarded[label] & tube).any(), label
        # lung elsewhere untouched
        np.testing.assert_array_equal(guarded[label] & ~tube, lungs[label] & ~tube)


def test_no_trachea_no_change(chest) -> None:
    volume, masks = chest
    guarded, notes = _guard(volume, masks)
    assert not any("airways" in n for n in notes)
    np.testing.assert_array_equal(guarded[LUNG_LEFT], masks[LUNG_LEFT])


# ------------------------------------------------------------------ rib cage

CAGED_SPEC = PhantomSpec(slices=12, rows=192, columns=192, pixel_spacing_mm=2.5,
                         slice_thickness_mm=5.0, seed=7, ribs=True, arms=True,
                         arm_gap_mm=-8.0)  # arms pressed against the chest: one body


@pytest.fixture(scope="module")
def caged_chest():
    phantom = make_phantom(CAGED_SPEC)
    volume, _ = volume_from_datasets(ct_series_datasets(phantom))
    result = pl.get_pipeline("ct-body-lungs").run(volume)
    return volume, result.masks, phantom.labels


def test_lung_between_the_arm_and_the_chest_wall_is_dropped(caged_chest) -> None:
    from analysis.phantoms.trunk import LABEL_LUNG_LEFT, LABEL_LUNG_RIGHT
    volume, masks, labels = caged_chest
    # In the right arm, between the humerus and the ribs, 40 mm from the skin: deep
    # enough for the skin rule; only the rib cage says it is not lung.
    body = masks[BODY]
    row = int(np.argwhere(body[6]).mean(axis=0)[0])
    column = int(np.flatnonzero(body[6, row])[0]) + 26
    blob = _blob(body.shape, (row, column), 3) & body
    assert blob.any() and not (blob & masks[LUNG_RIGHT]).any()
    hu = volume.hu.copy()
    hu[blob] = -850.0  # parenchyma, so that only the cage rule applies
    armed = ImageVolume(hu=hu, spacing_mm=volume.spacing_mm, affine=volume.affine)
    guarded, notes = _guard(armed, {**masks, LUNG_RIGHT: masks[LUNG_RIGHT] | blob})
    assert not (guarded[LUNG_RIGHT] & blob).any()
    assert len(notes) == 1 and "outside the rib cage" in notes[0], notes
    truth = {LUNG_LEFT: labels == LABEL_LUNG_LEFT, LUNG_RIGHT: labels == LABEL_LUNG_RIGHT}
    for label in (LUNG_LEFT, LUNG_RIGHT):
        before = pl.dice(masks[label], truth[label])
        assert abs(pl.dice(guarded[label], truth[label]) - before) < 0.005, label


def test_the_cage_keeps_the_lungs_of_a_chest_with_arms(caged_chest) -> None:
    volume, masks, _ = caged_chest
    guarded, notes = _guard(volume, masks)
    assert notes == []
    for label in (LUNG_LEFT, LUNG_RIGHT):
        np.testing.assert_array_equal(guarded[label], masks[label])


# ------------------------------------------------------------------ diaphragm

BASES_SPEC = PhantomSpec(slices=16, rows=160, columns=160, pixel_spacing_mm=2.5,
                         slice_thickness_mm=5.0, seed=7, diaphragm=True, lung_taper=0.3,
                         lung_extent=0.75, ribs=True)  # lung bases, then upper abdomen


@pytest.fixture(scope="module")
def bases() -> tuple[ImageVolume, dict[str, np.ndarray]]:
    volume, _ = volume_from_datasets(ct_series_datasets(make_phantom(BASES_SPEC)))
    return volume, pl.get_pipeline("ct-body-lungs").run(volume).masks


def test_the_lung_bases_around_the_domes_are_kept(bases) -> None:
    volume, masks = bases
    assert masks[LUNG_RIGHT][8].any() and masks[LUNG_LEFT][8].any()  # crescents
    guarded, notes = _guard(volume, masks)
    assert notes == []
    for label in (LUNG_LEFT, LUNG_RIGHT):
        np.testing.assert_array_equal(guarded[label], masks[label])


def test_soft_tissue_lung_under_the_dome_is_dropped(bases) -> None:
    from scipy import ndimage

    volume, masks = bases
    # The right dome: within the lung's outline higher up, no longer lung on 8 and 9.
    right = masks[LUNG_RIGHT]
    dome = ndimage.binary_fill_holes(right[6]) & ~right[8] & ~right[9]
    assert dome.sum() > 100
    row, column = (int(v) for v in np.argwhere(dome).mean(axis=0))
    # Two slices of liver-dense "lung" below the base, under the dome (slices 10-11).
    rows, columns = np.ogrid[:dome.shape[0], :dome.shape[1]]
    blob = np.zeros(masks[BODY].shape, dtype=bool)
    blob[10:12] = (rows - row) ** 2 + (columns - column) ** 2 <= 4 ** 2
    assert not (blob & (masks[LUNG_LEFT] | masks[LUNG_RIGHT])).any()
    assert volume.hu[blob].mean() > 0  # soft tissue: the gas rule does not apply
    guarded, notes = _guard(volume, {**masks, LUNG_RIGHT: masks[LUNG_RIGHT] | blob})
    np.testing.assert_array_equal(guarded[LUNG_RIGHT], masks[LUNG_RIGHT])
    assert len(notes) == 1 and "below the diaphragm" in notes[0], notes


@pytest.mark.parametrize(("factor", "shape"), [(2, (3, 64, 64)), (3, (3, 63, 66)), (4, (2, 64, 128)),
                                               (4, (2, 66, 70)), (8, (2, 64, 64))])
def test_pooling_is_true_wherever_any_source_pixel_is(factor: int, shape: tuple[int, ...]) -> None:
    from analysis.anatomy import _Grid

    rng = np.random.default_rng(factor)
    mask = rng.random(shape) < 0.02  # sparse: most cells hold one pixel or none
    pooled = _Grid(factor, (1.0, 1.0, 1.0)).pool(mask)
    s, r, c = shape
    padded = np.zeros((s, -(-r // factor) * factor, -(-c // factor) * factor), dtype=bool)
    padded[:, :r, :c] = mask
    expected = padded.reshape(s, padded.shape[1] // factor, factor, -1, factor).any(axis=(2, 4))
    assert pooled.shape == expected.shape
    assert np.array_equal(pooled, expected)
    assert pooled.sum() > 0 and not pooled.all()


def _thighs(gap_open: bool) -> tuple[dict[str, np.ndarray], np.ndarray, tuple, np.ndarray]:
    """Two touching thighs (no ribs: no rib cage) with a thin air gap between them that
    the body mask closes over; the gap reaches the air outside at the front when open."""
    s, n, px = 12, 160, 1.0
    yy, xx = np.mgrid[:n, :n]
    hu = np.full((s, n, n), -1000.0, np.float32)
    body2d = ((yy - 80) ** 2 + (xx - 50) ** 2 <= 45 ** 2) | ((yy - 80) ** 2 + (xx - 110) ** 2 <= 45 ** 2)
    hu[:, body2d] = 40.0
    for cx in (50, 110):
        hu[:, (yy - 80) ** 2 + (xx - cx) ** 2 <= 10 ** 2] = 700.0  # the femurs
    gap = (abs(xx - 80) <= 1) & (yy >= 60) & (yy <= 100)
    hu[:, gap] = -600.0
    if gap_open:
        hu[:, (abs(xx - 80) <= 1) & (yy < 60) & (yy >= 35)] = -900.0  # out to the front
    false_lung = np.zeros((s, n, n), bool)
    false_lung[:, gap] = True
    body = np.broadcast_to(body2d | gap, (s, n, n)).copy()
    affine = np.array([[0, 0, px, 0], [0, px, 0, 0], [-5.0, 0, 0, 0], [0, 0, 0, 1.0]])
    masks = {BODY: body, LUNG_LEFT: np.zeros_like(false_lung), LUNG_RIGHT: false_lung}
    return masks, hu, (5.0, px, px), affine


def test_a_piece_open_to_the_air_outside_the_body_is_not_lung() -> None:
    masks, hu, spacing, affine = _thighs(gap_open=True)
    assert masks[LUNG_RIGHT].sum() * np.prod(spacing) / 1000 > 2  # mL: judged, not a speck
    guarded, notes = guard_lungs(masks, hu, spacing, affine, [])
    assert not guarded[LUNG_RIGHT].any(), notes
    assert any("open to the air outside the body" in note for note in notes), notes


def test_the_same_piece_closed_off_from_outside_air_is_left_to_the_other_rules() -> None:
    masks, hu, spacing, affine = _thighs(gap_open=False)
    guarded, notes = guard_lungs(masks, hu, spacing, affine, [])
    assert not any("open to the air" in note for note in notes), notes
    assert guarded[LUNG_RIGHT].sum() == masks[LUNG_RIGHT].sum()
