"""analysis.intensity and analysis.filters on small arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import filters, intensity


def test_to_hu_applies_slope_and_intercept():
    stored = np.array([[0, 1000], [1024, 4095]], dtype=np.uint16)
    hu = intensity.to_hu(stored, slope=2.0, intercept=-1024.0)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [[-1024, 976], [1024, 7166]])


def test_zoom_keeps_masks_boolean_and_values_in_place():
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[:, 2:6, 2:6] = True
    bigger = intensity.zoom(mask, (1, 2, 2))
    assert bigger.dtype == bool and bigger.shape == (4, 16, 16)
    assert bigger.sum() == 4 * mask.sum()
    assert bigger[:, 4:12, 4:12].all() and not bigger[:, :4].any()
    ramp = np.tile(np.arange(8, dtype=np.float32), (2, 8, 1))
    half = intensity.zoom(ramp, (1, 1, 0.5))
    np.testing.assert_allclose(half[0, 0], [0.5, 2.5, 4.5, 6.5], atol=0.05)


def test_resize_slices_area_averages_and_thresholds_masks():
    checker = np.indices((1, 8, 8)).sum(axis=0) % 2 * 100.0
    small = intensity.resize_slices(checker.astype(np.float32), (4, 4))
    np.testing.assert_allclose(small, 50.0)
    mask = np.zeros((3, 64, 64), dtype=bool)
    mask[1, 16:48, 8:40] = True
    up = intensity.resize_slices(mask, (128, 128))
    assert up.dtype == bool and not up[0].any() and not up[2].any()
    assert up[1].sum() == pytest.approx(4 * mask[1].sum(), rel=0.02)
    down = intensity.resize_slices(up, (64, 64))
    assert (down != mask).sum() <= 0.02 * mask.sum()


def test_scale_affine_keeps_the_field_of_view_centred():
    affine = np.array([[0, 0, 0.7, -180], [0, 0.7, 0, -170], [-2, 0, 0, 30], [0, 0, 0, 1.0]])
    scaled = intensity.scale_affine(affine, (10, 512, 512), (10, 256, 256))
    centre = affine @ [4.5, 255.5, 255.5, 1]
    np.testing.assert_allclose(scaled @ [4.5, 127.5, 127.5, 1], centre)
    np.testing.assert_allclose(scaled[:3, 2], [1.4, 0, 0])
    # The first coarse pixel covers the first two fine ones: its centre lies between them.
    np.testing.assert_allclose(scaled @ [0, 0, 0, 1], affine @ [0, 0.5, 0.5, 1])


def test_window_maps_centre_and_edges():
    out = intensity.window(np.array([-1000, -160, 40, 240, 3000]), center=40, width=400)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32
    assert intensity.to_uint8(np.array([40.0]), 40, 400)[0] == 128
    with pytest.raises(ValueError, match="width"):
        intensity.window(np.zeros(3), 0, 0)


def test_normalise_zscore_overall_and_inside_a_mask():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = intensity.normalise_zscore(values)
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, rel=1e-5)
    inside = np.array([True, True, True, True, False])
    zm = intensity.normalise_zscore(values, inside)
    assert zm[inside].mean() == pytest.approx(0, abs=1e-6)
    assert zm[inside].std() == pytest.approx(1, rel=1e-5)
    assert zm[-1] > 50
    np.testing.assert_array_equal(intensity.normalise_zscore(np.full(4, 7.0)), 0)
    with pytest.raises(ValueError, match="empty"):
        intensity.normalise_zscore(values, np.zeros(5, dtype=bool))


def test_normalise_minmax():
    np.testing.assert_allclose(intensity.normalise_minmax(np.array([10, 20, 30])), [0, 0.5, 1])
    clipped = intensity.normalise_minmax(np.array([-2000, 0, 2000]), -1000, 1000)
    np.testing.assert_allclose(clipped, [0, 0.5, 1])
    np.testing.assert_array_equal(intensity.normalise_minmax(np.full(3, 5.0)), 0)


# ------------------------------------------------------------------------- filters


def impulse_volume() -> np.ndarray:
    volume = np.zeros((3, 9, 9), dtype=np.float32)
    volume[1, 4, 4] = 900.0
    return volume


def test_mean_filter_spreads_an_impulse_within_its_slice_only():
    out = filters.mean_filter(impulse_volume(), 3)
    np.testing.assert_allclose(out[1, 3:6, 3:6], 100.0)
    assert out[1].sum() == pytest.approx(900.0)
    assert not out[0].any() and not out[2].any()


@pytest.mark.parametrize("size", [3, 5, 7])
def test_median_filter_removes_an_impulse_and_keeps_edges(size):
    volume = impulse_volume()
    volume[:, :, 6:] = 500.0  # a straight edge survives a median
    out = filters.median_filter(volume, size)
    assert out[1, 4, 4] == 0.0
    np.testing.assert_array_equal(out[:, :, 6:], 500.0)
    np.testing.assert_array_equal(out[:, :, :4], 0.0)


def test_gaussian_filter_smooths_and_preserves_mass():
    out = filters.gaussian_filter(impulse_volume(), 1.0)
    assert out[1, 4, 4] < 900.0 / 4
    assert out[1].sum() == pytest.approx(900.0, rel=0.01)
    assert out[1, 4, 3] == pytest.approx(out[1, 3, 4]) and out[1, 4, 3] > out[1, 4, 2] > 0
    assert not out[0].any()


@pytest.mark.parametrize("size", [0, 2, -3])
def test_filter_sizes_must_be_positive_odd(size):
    with pytest.raises(ValueError, match="odd"):
        filters.mean_filter(impulse_volume(), size)


def low_contrast() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(100, 120, size=(2, 64, 64)).astype(np.uint8)


def test_histogram_equalisation_stretches_to_full_range():
    out = filters.equalize_histogram(low_contrast())
    assert out.dtype == np.uint8 and out.shape == (2, 64, 64)
    assert out.min() < 20 and out.max() == 255
    assert filters.equalize_histogram(low_contrast()[0]).shape == (64, 64)


def test_clahe_raises_local_contrast():
    image = low_contrast()
    out = filters.clahe(image, clip_limit=4.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.std() > 3 * image.std()
    with pytest.raises(TypeError, match="uint8"):
        filters.clahe(image.astype(np.float32))


def test_enhance_hu_windows_then_equalises():
    hu = np.linspace(-1000, 1000, 2 * 32 * 32, dtype=np.float32).reshape(2, 32, 32)
    out = filters.enhance_hu(hu, center=40, width=400, adaptive=False)
    assert out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0
