"""Build an :class:`~analysis.types.ImageVolume` in Hounsfield units from a CT series.

Geometry and pixel transforms come from highdicom (``get_series_volume_positions`` to
order the slices, ``get_volume_from_series`` to decode and rescale them); this module
adds what the node needs on top: refusals that say what is wrong with a series, gantry
tilt (a sheared grid highdicom's orthogonal :class:`highdicom.Volume` cannot hold), and
the slice -> source dataset map a DICOM SEG needs to reference its source frames.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import DataElement, Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from analysis.types import ImageVolume

#: Gantry tilts up to 45 degrees are accepted; scanners tilt at most about 30.
_MAX_TILT_DEG = 45.0
_PERPENDICULAR_TOL = 1.0 - math.cos(math.radians(_MAX_TILT_DEG))
#: Orientation cosines that differ by less than this are "the same".
_ORIENTATION_TOL = 1e-4
#: Slices may deviate this fraction of the slice spacing from a regular stack.
_POSITION_RTOL = 0.05
_FRAME_OF_REFERENCE = 0x00200052
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class VolumeError(ValueError):
    """The datasets do not form one regular volume; the message says why."""


def frame_of_reference_note(datasets: Sequence[Dataset]) -> str | None:
    """What to tell the reader when one series has several FrameOfReferenceUIDs.

    Its slices are still stacked as one volume when their positions and orientation
    are consistent (checked when the volume is built): anonymizers are known to give
    every slice its own UID while the geometry stays one scan.
    """
    values = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(values) <= 1:
        return None
    return (f"the series has {len(values)} different FrameOfReferenceUIDs in "
            f"{len(datasets)} images; analysed as one volume because positions and "
            "orientation are consistent")


def volume_blocks_from_datasets(
    datasets: Sequence[Dataset],
) -> list[tuple[ImageVolume, list[int]]]:
    """One volume, or several where the slice spacing changes along the series.

    Sequential head protocols scan the posterior fossa in thinner slices than the
    brain above it: such a series is split into blocks of uniform spacing, each a
    regular volume, in slice order along the normal. A series with slices missing
    from an otherwise regular stack is refused as :func:`volume_from_datasets`
    refuses it: that series is incomplete, not a different protocol.

    Returns
    -------
    list of (volume, source_index)
        ``source_index`` maps each block's slices to indices in ``datasets``.
    """
    try:
        return [volume_from_datasets(datasets)]
    except VolumeError:
        blocks = _uniform_blocks(datasets)
        if blocks is None:
            raise
    out = []
    for block in blocks:
        volume, order = volume_from_datasets([datasets[i] for i in block])
        out.append((volume, [block[k] for k in order]))
    return out


def _uniform_blocks(datasets: Sequence[Dataset]) -> list[list[int]] | None:
    """Indices of runs of uniformly spaced slices, or ``None`` where the series is
    irregular in a way blocks do not explain (duplicates, missing slices, mixed
    orientations)."""
    if len(datasets) < 3:
        return None
    try:
        _check_consistent(datasets)
        for i, ds in enumerate(datasets):
            _check_image(i, ds)
    except VolumeError:
        return None
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    distance = positions @ _normal(datasets[0].ImageOrientationPatient)
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    gaps = np.diff(distance[order])
    if gaps.min() < 1e-3 or _missing_slices(gaps):
        return None
    blocks: list[list[int]] = [[order[0]]]
    block_gap: float | None = None
    for index, gap in zip(order[1:], gaps, strict=True):
        if block_gap is None or abs(gap - block_gap) <= _POSITION_RTOL * block_gap:
            blocks[-1].append(index)
            block_gap = gap if block_gap is None else block_gap
        else:  # the spacing changes: this slice starts the next block
            blocks.append([index])
            block_gap = None
    # A protocol changes its spacing a few times; many short runs are a stack whose
    # slices wander, which blocks would only hide.
    if len(blocks) < 2 or len(blocks) > max(2, len(datasets) // 4):
        return None
    return blocks


def _missing_slices(gaps: np.ndarray) -> bool:
    """Single gaps of a whole multiple of the spacing on both sides: slices missing."""
    for k in range(1, len(gaps) - 1):
        before, after = gaps[k - 1], gaps[k + 1]
        if abs(before - after) > _POSITION_RTOL * before:
            continue
        ratio = gaps[k] / before
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.05:
            return True
    return False


def volume_from_datasets(datasets: Sequence[Dataset]) -> tuple[ImageVolume, list[int]]:
    """Stack a single-frame CT series into a volume in Hounsfield units.

    Parameters
    ----------
    datasets
        The series' single-frame image datasets, in any order. Datasets without a
        transfer syntax in ``file_meta`` are taken to hold native pixel data; the
        caller's datasets are not modified.

    Returns
    -------
    volume
        float32 HU volume; slices ordered as highdicom orders them (along the slice
        normal that makes the index axes right-handed, which may reverse the input).
        With gantry tilt the affine is sheared: its slice column is the step between
        image positions, and ``spacing_mm[0]`` is the distance between slice planes.
    source_index
        ``source_index[k]`` is the index in ``datasets`` of volume slice ``k``.

    Raises
    ------
    VolumeError
        Empty input, non-image or multi-frame objects, no pixel data or geometry,
        mixed sizes, orientations, spacings or series, duplicate positions, missing
        slices or uneven spacing, undecodable pixel data.
    """
    if len(datasets) == 0:
        raise VolumeError("no datasets given")
    for i, ds in enumerate(datasets):
        _check_image(i, ds)
    _check_consistent(datasets)
    readable = _one_frame_of_reference(
        [_with_transfer_syntax(i, ds) for i, ds in enumerate(datasets)])
    order = _slice_order(readable)
    ordered = [readable[i] for i in order]
    try:
        hd_volume = hd.get_volume_from_series(
            ordered,
            dtype=np.float32,
            apply_real_world_transform=False,
            apply_modality_transform=None,
            apply_voi_transform=False,
            apply_presentation_lut=False,
            apply_palette_color_lut=False,
            apply_icc_profile=False,
            perpendicular_tol=_PERPENDICULAR_TOL,
            orientation_tol=_ORIENTATION_TOL,
        )
    except Exception as exc:  # decoders raise many types; all mean "unusable"
        raise VolumeError(f"cannot build a volume from the series: {exc}") from exc
    first_position = np.asarray(ordered[0].ImagePositionPatient, dtype=np.float64)
    if not np.allclose(hd_volume.position, first_position, atol=1e-3):
        # Our index list assumes highdicom keeps the order it was given sorted in.
        raise VolumeError("highdicom stacked the slices in an unexpected order")
    affine, slice_spacing = _stack_affine(ordered, np.asarray(hd_volume.affine, dtype=np.float64))
    # PixelSpacing as written, not recovered from the affine with rounding error.
    row_spacing, column_spacing = (float(s) for s in ordered[0].PixelSpacing)
    volume = ImageVolume(
        hu=np.ascontiguousarray(hd_volume.array, dtype=np.float32),
        spacing_mm=(slice_spacing, row_spacing, column_spacing),
        affine=affine,
    )
    return volume, order


def _describe(i: int, ds: Dataset) -> str:
    sop_class = ds.get("SOPClassUID")
    name = UID(str(sop_class)).name if sop_class else "unknown SOP class"
    return f"dataset {i} ({name}, InstanceNumber {ds.get('InstanceNumber', '?')})"


def _check_image(i: int, ds: Dataset) -> None:
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise VolumeError(f"{_describe(i, ds)} has no pixel data: not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise VolumeError(
            f"{_describe(i, ds)} is a multi-frame object ({frames} frames); "
            "only series of single-frame images can be stacked"
        )
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(keyword) is None:
            raise VolumeError(f"{_describe(i, ds)} has no {keyword}: cannot place it in space")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{_describe(i, ds)} is a colour image; CT volumes are greyscale")


def _check_consistent(datasets: Sequence[Dataset]) -> None:
    # FrameOfReferenceUID is not checked here: anonymizers give each slice its own
    # (frame_of_reference_note); the positions decide whether the slices form a stack.
    values = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(values) > 1:
        raise VolumeError(f"mixed SeriesInstanceUIDs ({len(values)} different): not one series")
    sizes = Counter(f"{ds.Rows}x{ds.Columns}" for ds in datasets)
    if len(sizes) > 1:
        raise VolumeError(f"mixed image sizes (rows x columns): {_counts(sizes)}")
    first = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    orientations = Counter(
        _rounded(ds.ImageOrientationPatient)
        for ds in datasets
        if not np.allclose(
            np.asarray(ds.ImageOrientationPatient, dtype=np.float64), first, atol=_ORIENTATION_TOL
        )
    )
    if orientations:
        orientations[_rounded(first)] = len(datasets) - sum(orientations.values())
        raise VolumeError(f"mixed orientations (ImageOrientationPatient): {_counts(orientations)}")
    # Exact, as highdicom requires: a stack with two pixel sizes is two series.
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    spacings = Counter(
        _rounded(ds.PixelSpacing)
        for ds in datasets
        if [float(v) for v in ds.PixelSpacing] != spacing
    )
    if spacings:
        spacings[_rounded(spacing)] = len(datasets) - sum(spacings.values())
        raise VolumeError(f"mixed pixel spacings (PixelSpacing): {_counts(spacings)}")


def _rounded(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(
        f"{value} in {n} dataset{'s' * (n != 1)}" for value, n in counter.most_common()
    )


def _with_transfer_syntax(i: int, ds: Dataset) -> Dataset:
    """A shallow copy to decode, so the caller's dataset keeps no cached pixel array.

    In-memory datasets (``analysis.phantoms.dicom_series``, network receipts before writing) often
    lack ``file_meta``; native pixel data decodes the same under any little endian
    syntax, whereas encapsulated data without its syntax cannot be decoded at all.
    """
    readable = copy.copy(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return readable
    pixel_element = ds.data_element("PixelData")  # the element (None if absent), not its bytes
    if pixel_element is not None and pixel_element.is_undefined_length:
        raise VolumeError(f"{_describe(i, ds)} has compressed pixel data but no transfer syntax")
    readable.file_meta = FileMetaDataset()
    readable.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return readable


def _one_frame_of_reference(datasets: list[Dataset]) -> list[Dataset]:
    """Copies that share the first slice's FrameOfReferenceUID, if theirs differ.

    highdicom stacks only slices of one frame of reference; whether differing UIDs
    still make one stack is for the positions to say (frame_of_reference_note).
    """
    uid = datasets[0].get("FrameOfReferenceUID")
    if all(ds.get("FrameOfReferenceUID") == uid for ds in datasets):
        return datasets
    out = []
    for ds in datasets:
        # A new element dict and a new element: setting the attribute would change
        # the element object that the caller's dataset shares.
        copied = Dataset(dict(ds.items()))
        copied.file_meta = ds.file_meta
        copied[_FRAME_OF_REFERENCE] = DataElement(_FRAME_OF_REFERENCE, "UI", uid)
        out.append(copied)
    return out


def _slice_order(datasets: Sequence[Dataset]) -> list[int]:
    """Volume slice -> dataset index, in the order highdicom stacks the slices."""
    try:
        _, positions = hd.spatial.get_series_volume_positions(
            datasets,
            perpendicular_tol=_PERPENDICULAR_TOL,
            orientation_tol=_ORIENTATION_TOL,
        )
    except ValueError as exc:
        raise VolumeError(f"cannot stack the series: {exc}") from exc
    if positions is None:
        raise VolumeError(_explain_irregular(datasets))
    order = [0] * len(datasets)
    for dataset_index, slice_index in enumerate(positions):
        order[slice_index] = dataset_index
    return order


def _normal(orientation: Sequence[float]) -> np.ndarray:
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    return normal / np.linalg.norm(normal)


def _explain_irregular(datasets: Sequence[Dataset]) -> str:
    """Why highdicom found no regular stack: only computed when it has refused."""
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    distance = positions @ _normal(datasets[0].ImageOrientationPatient)
    order = np.argsort(distance, kind="stable")
    for a, b in zip(order[:-1], order[1:], strict=True):
        if np.allclose(positions[a], positions[b], atol=1e-3):
            return (
                f"duplicate slice position {_rounded(positions[a])} in "
                f"{_describe(int(a), datasets[a])} and {_describe(int(b), datasets[b])}"
            )
    gaps = np.diff(distance[order])
    if np.min(gaps) < 1e-3:
        return "two slices lie in the same plane at different in-plane positions: not one stack"
    step = float(np.median(gaps))
    multiples = gaps / step
    odd = np.flatnonzero(np.abs(multiples - 1.0) > 0.01)
    whole = np.abs(multiples[odd] - np.round(multiples[odd])) < 0.05
    if odd.size and whole.all() and (np.round(multiples[odd]) >= 2).all():
        first = int(odd[0])
        missing = int(np.sum(np.round(multiples[odd]) - 1))
        return (
            f"missing slice(s): {missing} missing; a gap of {gaps[first]:.3g} mm between slice "
            f"positions {distance[order][first]:.4g} and {distance[order][first + 1]:.4g} mm "
            f"where the spacing is {step:.3g} mm"
        )
    if odd.size:
        return f"uneven slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm"
    return "slice positions do not lie on a line along the slice normal (tilt over 45 degrees?)"


def _stack_affine(ordered: Sequence[Dataset], affine: np.ndarray) -> tuple[np.ndarray, float]:
    """Replace the affine's slice column by the actual step between image positions.

    highdicom places slices along the normal, which is right without tilt; with tilt
    the positions step obliquely, so the true grid is sheared. The slice spacing
    returned is the distance between slice planes, so voxel volumes stay right.
    """
    normal = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    if len(ordered) == 1:
        thickness = float(ordered[0].get("SliceThickness") or 0.0)
        step = normal * (thickness if thickness > 0 else 1.0)
    else:
        positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=np.float64)
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)
        expected = positions[0] + np.outer(np.arange(len(ordered)), step)
        deviation = float(np.abs(positions - expected).max())
        if deviation > _POSITION_RTOL * float(np.linalg.norm(step)):
            raise VolumeError(
                f"slice positions deviate up to {deviation:.3g} mm from a straight, regular stack"
            )
    affine = affine.copy()
    affine[:3, 0] = step
    return affine, float(abs(step @ normal))
