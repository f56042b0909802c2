"""analysis.volume: CT series -> HU volume, slice order, geometry, and refusals."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from analysis.phantoms.dicom_series import ct_series_datasets
from analysis.phantoms.trunk import PhantomSpec, make_phantom
from analysis.volume import (
    VolumeError,
    frame_of_reference_note,
    volume_blocks_from_datasets,
    volume_from_datasets,
)
from tests.conftest import SHARED_DATA

SPEC = PhantomSpec(slices=6, rows=32, columns=40, pixel_spacing_mm=1.5, slice_thickness_mm=2.5)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SPEC)


@pytest.fixture
def series(phantom):
    return ct_series_datasets(phantom)


def slice_origin(volume, k: int) -> np.ndarray:
    return (volume.affine @ np.array([k, 0, 0, 1.0]))[:3]


def assert_geometry_matches(volume, order, datasets) -> None:
    """Every volume slice sits where its source dataset says it does."""
    assert sorted(order) == list(range(len(datasets)))
    for k, index in enumerate(order):
        np.testing.assert_allclose(
            slice_origin(volume, k),
            np.asarray(datasets[index].ImagePositionPatient, dtype=np.float64),
            atol=1e-3,
        )


def test_synthetic_series_gives_the_phantom_in_hu(phantom, series):
    volume, order = volume_from_datasets(series)
    assert volume.hu.dtype == np.float32
    assert volume.hu.shape == (6, 32, 40)
    assert volume.spacing_mm == (2.5, 1.5, 1.5)
    # Stored values are rounded to integers (and clipped at -1024 HU).
    expected = np.clip(phantom.hu, -1024, None)
    assert np.abs(volume.hu[[order.index(i) for i in range(6)]] - expected).max() <= 0.5
    assert_geometry_matches(volume, order, series)
    # Columns run towards the patient's left (+x), rows towards the back (+y).
    assert volume.affine[0, 2] == pytest.approx(1.5)
    assert volume.affine[1, 1] == pytest.approx(1.5)


def test_callers_datasets_are_not_given_file_meta(series):
    volume_from_datasets(series)
    assert not hasattr(series[0], "file_meta") or "TransferSyntaxUID" not in series[0].file_meta


def test_shuffled_series_index_list_points_at_each_slices_source(series):
    reference, reference_order = volume_from_datasets(series)
    shuffled = series[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != series
    volume, order = volume_from_datasets(shuffled)
    np.testing.assert_array_equal(volume.hu, reference.hu)
    assert_geometry_matches(volume, order, shuffled)
    for k, index in enumerate(order):
        assert shuffled[index].SOPInstanceUID == series[reference_order[k]].SOPInstanceUID
        stored = np.frombuffer(shuffled[index].PixelData, np.uint16).reshape(volume.hu.shape[1:])
        np.testing.assert_array_equal(volume.hu[k], stored - 1024.0)


def test_feet_to_head_input_is_stacked_the_same_way(series):
    forward, forward_order = volume_from_datasets(series)
    backward, backward_order = volume_from_datasets(series[::-1])
    np.testing.assert_array_equal(forward.hu, backward.hu)
    assert backward_order == [len(series) - 1 - i for i in forward_order]


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_compressed_pixel_data(series, syntax):
    reference, _ = volume_from_datasets(series)
    for ds in series:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.compress(syntax)
    volume, _ = volume_from_datasets(series)
    np.testing.assert_array_equal(volume.hu, reference.hu)


def test_rescale_slope_and_intercept_are_applied(series):
    for ds in series:
        ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) // 2).tobytes()
        ds.RescaleSlope = 2
    reference = np.frombuffer(series[0].PixelData, np.uint16).reshape(32, 40) * 2.0 - 1024.0
    volume, order = volume_from_datasets(series)
    np.testing.assert_array_equal(volume.hu[order.index(0)], reference.astype(np.float32))


def test_single_slice_uses_slice_thickness(series):
    volume, order = volume_from_datasets(series[2:3])
    assert order == [0] and volume.hu.shape == (1, 32, 40)
    assert volume.spacing_mm[0] == 2.5
    assert np.linalg.norm(volume.affine[:3, 0]) == pytest.approx(2.5)
    del series[2].SliceThickness
    volume, _ = volume_from_datasets(series[2:3])
    assert volume.spacing_mm[0] == 1.0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s[:2] + s[3:], "missing slice"),
        (lambda s: s + [s[2]], "duplicate slice position"),
        (lambda s: [], "no datasets"),
    ],
)
def test_refuses_broken_stacks(series, damage, message):
    with pytest.raises(VolumeError, match=message):
        volume_from_datasets(damage(series))


def test_refuses_uneven_spacing(series):
    position = series[3].ImagePositionPatient
    series[3].ImagePositionPatient = [position[0], position[1], float(position[2]) + 0.8]
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        volume_from_datasets(series)


def test_refuses_mixed_sizes(phantom, series):
    small = ct_series_datasets(make_phantom(PhantomSpec(slices=1, rows=16, columns=16)))[0]
    small.SeriesInstanceUID = series[0].SeriesInstanceUID
    small.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    expected = r"mixed image sizes .*32x40 in 6 datasets, 16x16 in 1 dataset"
    with pytest.raises(VolumeError, match=expected):
        volume_from_datasets([*series, small])


def test_refuses_mixed_orientations(series):
    series[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(VolumeError, match="mixed orientations"):
        volume_from_datasets(series)


def test_refuses_mixed_series(series):
    series[1].SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(VolumeError, match="mixed SeriesInstanceUIDs"):
        volume_from_datasets(series)


def test_refuses_objects_without_pixel_data(series):
    report = Dataset()
    report.SOPClassUID = pydicom.uid.BasicTextSRStorage
    report.SeriesInstanceUID = series[0].SeriesInstanceUID
    with pytest.raises(VolumeError, match=r"dataset 6 \(Basic Text SR Storage.*no pixel data"):
        volume_from_datasets([*series, report])


def test_refuses_multiframe(series):
    series[0].NumberOfFrames = 3
    with pytest.raises(VolumeError, match="multi-frame object"):
        volume_from_datasets(series)


def test_refuses_images_without_position(series):
    del series[4].ImagePositionPatient
    with pytest.raises(VolumeError, match="dataset 4 .*no ImagePositionPatient"):
        volume_from_datasets(series)


# ------------------------------------------------------------------ real scanner data


def real_series(name: str) -> list[Dataset]:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data not available: {folder}")
    files = [p for p in sorted(folder.glob("*.dcm")) if p.name != "DIRFILE.dcm"]
    return [pydicom.dcmread(p) for p in files]


def test_tilted_gantry_series_keeps_its_sheared_geometry():
    datasets = [ds for ds in real_series("ct-phantom-tilted") if "PixelData" in ds]
    volume, order = volume_from_datasets(datasets)
    assert volume.hu.shape == (54, 512, 512)
    tilt = np.radians(18.5)
    # Planes are 2.5 mm apart along z, so cos(tilt) * 2.5 mm apart along their normal.
    assert volume.spacing_mm[0] == pytest.approx(2.5 * np.cos(tilt), rel=1e-3)
    assert_geometry_matches(volume, order, datasets)
    k = 17
    source = datasets[order[k]]
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(volume.hu[k], expected.astype(np.float32))
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000
    assert volume.voxel_volume_ml == pytest.approx(voxel_ml, rel=1e-6)


def test_real_single_chest_slice():
    (dataset,) = real_series("ct-chest-slice")
    volume, order = volume_from_datasets([dataset])
    assert order == [0] and volume.hu.shape == (1, 512, 512)
    assert volume.spacing_mm == pytest.approx((5.0, 0.661468, 0.661468))
    assert getattr(dataset, "_pixel_array", None) is None  # decoded on a copy, not cached here
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(volume.hu[0], expected.astype(np.float32))


def test_real_seg_object_is_refused():
    folder = SHARED_DATA / "ct-liver-3slice"
    if not folder.is_dir():
        pytest.skip(f"shared data not available: {folder}")
    seg = pydicom.dcmread(folder / "liver-seg-dcmqi.dcm")
    with pytest.raises(VolumeError, match="Segmentation Storage.*multi-frame"):
        volume_from_datasets([seg])


# ------------------------------------------------------- series real scanners produce


def _sequential_head(phantom_slices: int = 24, thin: int = 10) -> list[Dataset]:
    """A sequential protocol: ``thin`` slices at 2.5 mm, then every other slice (5 mm)."""
    datasets = ct_series_datasets(make_phantom(PhantomSpec(
        slices=phantom_slices, rows=32, columns=40, pixel_spacing_mm=1.5,
        slice_thickness_mm=2.5)))
    return datasets[:thin] + datasets[thin + 1::2]


def test_uneven_spacing_is_split_into_uniform_blocks():
    datasets = _sequential_head()
    with pytest.raises(VolumeError, match="missing slice|uneven slice spacing"):
        volume_from_datasets(datasets)  # one regular stack it is not
    shuffled = datasets[:]
    random.Random(3).shuffle(shuffled)
    blocks = volume_blocks_from_datasets(shuffled)
    assert sorted(v.spacing_mm[0] for v, _ in blocks) == [pytest.approx(2.5), pytest.approx(5.0)]
    # The slice between the two spacings may join either block.
    assert sum(v.hu.shape[0] for v, _ in blocks) == len(shuffled) == 17
    assert sorted(i for _, order in blocks for i in order) == list(range(len(shuffled)))
    for volume, order in blocks:
        assert_geometry_matches_subset(volume, order, shuffled)
    # The blocks follow each other along the slice normal: their z ranges are apart.
    (a0, a1), (b0, b1) = (sorted((slice_origin(v, 0)[2], slice_origin(v, v.hu.shape[0] - 1)[2]))
                          for v, _ in blocks)
    assert a1 < b0 or b1 < a0


def test_missing_slices_and_wandering_slices_are_still_refused(series):
    thin = _sequential_head(phantom_slices=24, thin=24)
    with pytest.raises(VolumeError, match="missing slice"):
        volume_blocks_from_datasets(thin[:8] + thin[9:])
    position = series[3].ImagePositionPatient
    series[3].ImagePositionPatient = [position[0], position[1], float(position[2]) + 0.8]
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        volume_blocks_from_datasets(series)


def test_a_frame_of_reference_per_slice_is_one_volume_with_a_note(series):
    for ds in series:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    uids = [ds.FrameOfReferenceUID for ds in series]
    note = frame_of_reference_note(series)
    assert note and "6 different FrameOfReferenceUIDs in 6 images" in note
    volume, order = volume_from_datasets(series)
    assert_geometry_matches(volume, order, series)
    assert [ds.FrameOfReferenceUID for ds in series] == uids  # the caller's are kept
    assert frame_of_reference_note(series[:1]) is None


def assert_geometry_matches_subset(volume, order, datasets) -> None:
    for k, index in enumerate(order):
        np.testing.assert_allclose(
            slice_origin(volume, k),
            np.asarray(datasets[index].ImagePositionPatient, dtype=np.float64), atol=1e-3)
