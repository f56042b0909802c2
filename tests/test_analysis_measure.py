"""analysis.measure against analytic values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from analysis import measure
from analysis.measure import max_diameter_mm, measure_segment, surface_area_mm2


def ball(radius_mm: float, spacing: tuple[float, float, float], margin: int = 3) -> np.ndarray:
    shape = [int(np.ceil(2 * radius_mm / s)) + 2 * margin for s in spacing]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    return z**2 + y**2 + x**2 <= radius_mm**2


@pytest.mark.parametrize(
    "radius, spacing",
    [(20.0, (1.0, 1.0, 1.0)), (16.0, (2.0, 0.8, 0.8)), (30.0, (2.5, 1.5, 1.5))],
)
def test_sphere_volume_surface_and_diameter(radius, spacing):
    mask = ball(radius, spacing)
    hu = np.where(mask, 40.0, -1000.0).astype(np.float32)
    m = measure_segment("sphere", mask, hu, spacing)
    assert m.label == "sphere" and m.voxels == int(mask.sum())
    assert m.volume_ml == pytest.approx(4 / 3 * np.pi * radius**3 / 1000, rel=0.03)
    assert m.surface_area_mm2 == pytest.approx(4 * np.pi * radius**2, rel=0.05)
    assert abs(m.max_diameter_mm - 2 * radius) <= max(spacing)
    assert m.mean_hu == pytest.approx(40.0) and m.std_hu == pytest.approx(0.0)


def test_large_sphere_takes_the_coarse_surface_path():
    mask = ball(60.0, (1.0, 1.0, 1.0), margin=1)
    assert mask.size > measure._SURFACE_VOXEL_BUDGET
    assert surface_area_mm2(mask, (1, 1, 1)) == pytest.approx(4 * np.pi * 60.0**2, rel=0.03)
    assert max_diameter_mm(mask, (1, 1, 1)) == pytest.approx(120.0, abs=1.0)


def test_box_statistics_and_diagonal_are_exact():
    mask = np.zeros((10, 20, 30), dtype=bool)
    mask[2:6, 5:15, 3:23] = True  # 4 x 10 x 20 voxels
    hu = np.zeros(mask.shape, dtype=np.float32)
    hu[2:6, 5:15, 3:13] = 10.0
    hu[2:6, 5:15, 13:23] = 30.0
    m = measure_segment("box", mask, hu, (2.0, 0.5, 0.5))
    assert m.voxels == 800 and m.volume_ml == pytest.approx(800 * 0.5 / 1000)
    assert m.mean_hu == pytest.approx(20.0) and m.std_hu == pytest.approx(10.0)
    diagonal = np.sqrt((3 * 2.0) ** 2 + (9 * 0.5) ** 2 + (19 * 0.5) ** 2)
    assert m.max_diameter_mm == pytest.approx(diagonal)


def test_box_surface_within_its_rounded_edges():
    mask = np.zeros((18, 46, 46), dtype=bool)
    mask[3:15, 3:43, 3:43] = True  # 24 x 20 x 20 mm
    # Smoothing rounds a box's sharp edges (organs have none): about 5 % less area.
    area = surface_area_mm2(mask, (2.0, 0.5, 0.5))
    assert area == pytest.approx(2 * (24 * 20 + 24 * 20 + 20 * 20), rel=0.08)


def test_single_slice_mask_is_a_slab_one_slice_thick():
    mask = np.zeros((1, 120, 170), dtype=bool)
    mask[0, 10:110, 10:160] = True  # 100 x 150 mm, 5 mm thick
    m = measure_segment("flat", mask, np.zeros(mask.shape, np.float32), (5.0, 1.0, 1.0))
    assert m.volume_ml == pytest.approx(15000 * 5 / 1000)
    assert m.surface_area_mm2 == pytest.approx(2 * 15000 + 500 * 5, rel=0.05)
    assert m.max_diameter_mm == pytest.approx(np.hypot(99, 149))


def test_a_line_of_voxels_and_a_single_voxel():
    line = np.zeros((5, 5, 40), dtype=bool)
    line[2, 2, 5:35] = True
    assert max_diameter_mm(line, (1.0, 1.0, 0.5)) == pytest.approx(29 * 0.5)
    assert surface_area_mm2(line, (1.0, 1.0, 0.5)) > 0
    dot = np.zeros((5, 5, 5), dtype=bool)
    dot[2, 2, 2] = True
    m = measure_segment("dot", dot, np.full(dot.shape, 7.0, np.float32), (2.0, 1.0, 1.0))
    assert m.voxels == 1 and m.volume_ml == pytest.approx(0.002)
    assert m.max_diameter_mm == 0.0 and m.mean_hu == 7.0


def test_mask_touching_the_edge_still_has_a_closed_surface():
    inner = np.zeros((20, 20, 20), dtype=bool)
    inner[5:15, 5:15, 5:15] = True
    edge = np.zeros((20, 20, 20), dtype=bool)
    edge[:10, :10, :10] = True
    inner_area = surface_area_mm2(inner, (1, 1, 1))
    assert surface_area_mm2(edge, (1, 1, 1)) == pytest.approx(inner_area, rel=1e-6)


def test_empty_mask_measures_zero():
    empty = np.zeros((4, 4, 4), bool)
    m = measure_segment("none", empty, np.ones((4, 4, 4), np.float32), (1, 1, 1))
    values = (m.voxels, m.volume_ml, m.mean_hu, m.std_hu, m.surface_area_mm2, m.max_diameter_mm)
    assert values == (0, 0, 0, 0, 0, 0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        measure_segment("x", np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), np.float32), (1, 1, 1))


def test_pairwise_maximum_matches_brute_force_on_many_points():
    points = np.random.default_rng(0).normal(size=(5000, 3)) * [30.0, 10.0, 5.0]
    brute = pdist(points).max()
    assert measure._max_pairwise_distance(points) == pytest.approx(brute, rel=1e-3)
