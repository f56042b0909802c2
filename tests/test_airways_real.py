"""The airway rule on a real chest (LIDC-IDRI-0314 in ../shared/data; skipped when
absent): the trachea is followed from the top down past the carina at full
resolution, and no final lung is left inside it, whichever segmenter made the lungs."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from analysis import airways, anatomy
from analysis import pipeline as pl
from analysis.anatomy import guard_lungs
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume
from analysis.volume import volume_from_datasets
from tests.conftest import SHARED_DATA

LIDC = SHARED_DATA / "ct-chest-lidc"
pytestmark = pytest.mark.skipif(not LIDC.is_dir(), reason=f"real data folder {LIDC} is absent")

#: Read by eye on the series (slices head first, 1 mm): the trachea enters the chest
#: at about slice 6 and splits into the main bronchi on slice 90.
CARINA_SLICE = 90
#: The trachea's lumen, as an independent check: darker than parenchyma.
LUMEN_HU = -900.0


@pytest.fixture(scope="module")
def lidc() -> tuple[ImageVolume, dict[str, dict[str, np.ndarray]]]:
    datasets = [dcmread(p) for p in sorted(LIDC.glob("*.dcm"))]
    volume, _ = volume_from_datasets(datasets)
    result = pl.get_pipeline("ct-body-lungs").run(volume)
    return volume, result.candidates


def _column(volume: ImageVolume, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    f = anatomy._factor(volume.hu.shape, volume.spacing_mm[1])
    grid = anatomy._Grid(f, (volume.spacing_mm[0], volume.spacing_mm[1] * f,
                             volume.spacing_mm[2] * f))
    lung = grid.pool(masks[LUNG_LEFT] | masks[LUNG_RIGHT])
    return airways.find_airways(airways.pooled_mean(volume.hu, f), grid.pool(masks[BODY]),
                                lung, grid.spacing_mm, volume.affine, f), f


def test_the_airways_are_traced_from_the_top_past_the_carina(lidc) -> None:
    volume, candidates = lidc
    column, f = _column(volume, candidates["classical"])
    ks = np.flatnonzero(column.any(axis=(1, 2)))
    assert ks[0] <= 10, ks[0]
    traced = airways.trace_airways(volume.hu, column, f, volume.spacing_mm, volume.affine)
    ks = np.flatnonzero(traced.any(axis=(1, 2)))
    assert ks[0] <= 10 and ks[-1] >= CARINA_SLICE + 10, (ks[0], ks[-1])
    # Below the carina, two main bronchi (not lung: each under 3 cm2).
    labels, n = ndimage.label(traced[CARINA_SLICE + 3])
    assert n == 2, n
    area_cm2 = np.bincount(labels.ravel())[1:] * volume.spacing_mm[1] * volume.spacing_mm[2] / 100
    assert (area_cm2 < 3.0).all(), area_cm2
    # Above it, one trachea of 1-6 cm2 on every slice.
    for k in range(ks[0] + 5, CARINA_SLICE - 1, 10):
        area = traced[k].sum() * volume.spacing_mm[1] * volume.spacing_mm[2] / 100
        assert 1.0 < area < 6.0, (k, area)


@pytest.mark.parametrize("source", ["cnn", "classical"])
def test_no_lung_left_in_the_trachea(lidc, source: str) -> None:
    volume, candidates = lidc
    masks = candidates[source]
    traced = airways.trace_airways(volume.hu, *_column(volume, masks), volume.spacing_mm,
                                   volume.affine)
    # The check's own trachea: the lumen components the trace holds above the carina.
    trachea = np.zeros_like(traced)
    for k in range(CARINA_SLICE):
        if traced[k].any():
            labels, _ = ndimage.label(volume.hu[k] < LUMEN_HU)
            hit = np.unique(labels[traced[k]])
            trachea[k] = np.isin(labels, hit[hit > 0])
    assert trachea.sum() * volume.voxel_volume_ml > 10.0  # this lumen: about 19 mL
    guarded, _ = guard_lungs(masks, volume.hu, volume.spacing_mm, volume.affine, [])
    for label in (LUNG_LEFT, LUNG_RIGHT):
        left_in = int((guarded[label] & trachea).sum())
        assert left_in == 0, (label, left_in * volume.voxel_volume_ml)
