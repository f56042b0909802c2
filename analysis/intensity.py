"""Intensity and grid operations on CT arrays: HU rescale, resampling, windowing, normalising.

Slice-wise resizing goes through OpenCV, which is several times faster than
:func:`scipy.ndimage.zoom` for the in-plane downsampling a pipeline does first;
:func:`zoom` is there for true 3D resampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage


def to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Apply a linear modality LUT (RescaleSlope/RescaleIntercept) to stored values.

    Parameters
    ----------
    stored
        Stored pixel values, any integer or float dtype.
    slope, intercept
        ``RescaleSlope`` and ``RescaleIntercept`` of the image.

    Returns
    -------
    numpy.ndarray
        float32 array of ``stored``'s shape, ``stored * slope + intercept``.
    """
    hu = np.asarray(stored, dtype=np.float32) * np.float32(slope)
    hu += np.float32(intercept)
    return hu


def zoom(array: np.ndarray, factors: Sequence[float], *, order: int = 1) -> np.ndarray:
    """Resample by ``factors`` per axis; ``order=0`` (nearest) for masks and labels.

    Boolean input comes back boolean (nearest neighbour regardless of ``order``), so a
    mask never acquires in-between values.
    """
    # grid_mode=True scales voxel extents, not centre-to-centre distances, so a
    # resampled grid covers the same field of view (and matches scale_affine).
    if array.dtype == bool:
        source = array.view(np.uint8)
        zoomed = ndimage.zoom(source, factors, order=0, grid_mode=True, mode="nearest")
        return zoomed > 0
    return ndimage.zoom(array, factors, order=order, grid_mode=True, mode="nearest")


def resize_slices(array: np.ndarray, shape: tuple[int, int], *, mask: bool = False) -> np.ndarray:
    """Resize every slice of a ``(slices, rows, columns)`` array to ``shape`` in-plane.

    Parameters
    ----------
    array
        3D array; float values are resampled with area averaging when shrinking and
        linear interpolation when growing. Boolean masks are interpolated linearly and
        thresholded at 0.5, which gives smoother outlines than nearest neighbour
        while keeping the mask's area.
    shape
        Target ``(rows, columns)``.
    mask
        Treat ``array`` as a mask (implied for bool arrays).

    Returns
    -------
    numpy.ndarray
        ``(slices, *shape)``; bool for masks, else ``array``'s float dtype.
    """
    rows, columns = shape
    if array.shape[1:] == (rows, columns):
        return array.astype(bool) if mask else array.copy()
    if mask or array.dtype == bool:
        return _resize_mask(array, shape)
    shrinking = rows * columns < array.shape[1] * array.shape[2]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = np.empty((array.shape[0], rows, columns), dtype=array.dtype)
    for k in range(array.shape[0]):
        source = np.ascontiguousarray(array[k])
        out[k] = cv2.resize(source, (columns, rows), interpolation=interpolation)
    return out


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # 0/255 uint8 keeps OpenCV on its fast fixed-point path; > 127 is the 0.5 level.
    rows, columns = shape
    scaled = np.where(mask, np.uint8(255), np.uint8(0))
    out = np.zeros((mask.shape[0], rows, columns), dtype=bool)
    for k in np.flatnonzero(scaled.any(axis=(1, 2))):
        out[k] = cv2.resize(scaled[k], (columns, rows), interpolation=cv2.INTER_LINEAR) > 127
    return out


def scale_affine(
    affine: np.ndarray, source_shape: Sequence[int], target_shape: Sequence[int]
) -> np.ndarray:
    """The affine of a grid resampled from ``source_shape`` to ``target_shape``.

    Voxel centres of a resized grid sit at ``(i + 0.5) * f - 0.5`` in source indices
    (``f`` = source / target size), the convention of ``cv2.resize`` and
    ``scipy.ndimage.zoom(grid_mode=True)``.
    """
    factors = np.divide(source_shape, target_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(factors)
    index_map[:3, 3] = (factors - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ index_map


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window: ``center - width/2 -> 0`` and ``center + width/2 -> 1``, clipped."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def to_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window to 0..255 uint8, the input OpenCV's equalisation and CLAHE take."""
    return np.rint(window(hu, center, width) * 255.0).astype(np.uint8)


def normalise_zscore(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit standard deviation, statistics taken inside ``mask`` if given.

    A constant input (standard deviation 0) becomes all zeros rather than NaN.
    """
    values = array[mask] if mask is not None else array
    if values.size == 0:
        raise ValueError("cannot normalise over an empty mask")
    mean = float(np.mean(values, dtype=np.float64))
    std = float(np.std(values, dtype=np.float64))
    out = np.asarray(array, dtype=np.float32) - np.float32(mean)
    return out / np.float32(std) if std > 0 else out


def normalise_minmax(
    array: np.ndarray, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """Map ``[low, high]`` (default: the array's range) to ``[0, 1]``, clipping outside."""
    low = float(np.min(array)) if low is None else low
    high = float(np.max(array)) if high is None else high
    if high <= low:
        return np.zeros(np.shape(array), dtype=np.float32)
    out = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)
