"""Denoising and contrast enhancement, slice by slice.

CT noise is mostly in-plane (each slice is reconstructed separately) and slices are
often thicker than pixels are wide, so 2D filters per slice do the useful work at a
fraction of a 3D filter's cost; OpenCV's are the fastest available here.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from analysis.intensity import to_uint8


def _odd_size(size: int) -> int:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"filter size must be a positive odd number, got {size}")
    return size


def _float_slices(volume: np.ndarray) -> np.ndarray:
    if volume.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) array, got shape {volume.shape}")
    return np.ascontiguousarray(volume, dtype=np.float32)


def mean_filter(volume: np.ndarray, size: int = 3) -> np.ndarray:
    """Box mean over ``size`` x ``size`` pixels in each slice (float32 out)."""
    source = _float_slices(volume)
    size = _odd_size(size)
    out = np.empty_like(source)
    for k in range(source.shape[0]):
        out[k] = cv2.blur(source[k], (size, size), borderType=cv2.BORDER_REPLICATE)
    return out


def median_filter(volume: np.ndarray, size: int = 3) -> np.ndarray:
    """Median over ``size`` x ``size`` pixels in each slice (float32 out).

    Edge-preserving, so organ borders stay where thresholds expect them. OpenCV
    handles float input only for sizes 3 and 5; larger sizes fall back to SciPy.
    """
    source = _float_slices(volume)
    size = _odd_size(size)
    if size == 1:
        return source.copy()
    if size > 5:
        return ndimage.median_filter(source, size=(1, size, size), mode="nearest")
    out = np.empty_like(source)
    for k in range(source.shape[0]):
        out[k] = cv2.medianBlur(source[k], size)
    return out


def gaussian_filter(volume: np.ndarray, sigma_px: float = 1.0) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma_px`` pixels in each slice (float32 out)."""
    if sigma_px <= 0:
        raise ValueError(f"sigma must be positive, got {sigma_px}")
    source = _float_slices(volume)
    out = np.empty_like(source)
    for k in range(source.shape[0]):
        out[k] = cv2.GaussianBlur(source[k], (0, 0), sigma_px, borderType=cv2.BORDER_REPLICATE)
    return out


def _uint8_slices(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise TypeError(
            f"expected uint8 (use intensity.to_uint8 to window HU first), got {image.dtype}"
        )
    return image[np.newaxis] if image.ndim == 2 else image


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 image or of each slice of a uint8 volume."""
    slices = _uint8_slices(image)
    out = np.stack([cv2.equalizeHist(np.ascontiguousarray(s)) for s in slices])
    return out.reshape(image.shape)


def clahe(
    image: np.ndarray, clip_limit: float = 2.0, tiles: tuple[int, int] = (8, 8)
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of uint8 slices (OpenCV CLAHE)."""
    slices = _uint8_slices(image)
    operator = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tiles)
    out = np.stack([operator.apply(np.ascontiguousarray(s)) for s in slices])
    return out.reshape(image.shape)


def enhance_hu(hu: np.ndarray, center: float, width: float, *, adaptive: bool = True) -> np.ndarray:
    """Window HU to uint8, then CLAHE (``adaptive``) or global equalisation."""
    windowed = to_uint8(hu, center, width)
    return clahe(windowed) if adaptive else equalize_histogram(windowed)
