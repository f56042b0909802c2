"""Features of one segment, for measurement reports: first-order statistics of its
Hounsfield units, its 3D shape, and GLCM texture on a few representative slices.

The same building blocks as the series features (:mod:`analysis.features`), on a 1 mm
in-plane grid so that a feature does not depend on the pixel spacing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from analysis.features import HU_RANGE, finite_or_zero, first_order
from analysis.segment import bounding_box
from analysis.texture import glcm_features

#: In-plane grid of the segment features.
SEGMENT_GRID_MM = 1.0


def segment_features(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    glcm_window: tuple[float, float] = (-200.0, 1800.0),
    max_glcm_slices: int = 3,
) -> dict[str, float]:
    """First-order, shape and GLCM features of one segment, for measurement reports.

    Parameters
    ----------
    hu
        ``(slices, rows, columns)`` HU.
    mask
        bool mask of the segment on the same grid.
    spacing_mm
        ``(slice, row, column)`` spacing.
    glcm_window
        ``(centre, width)`` of the window quantised for the GLCM; the default spans
        aerated lung to soft tissue and bone edges.
    max_glcm_slices
        The GLCM is pooled over the segment's slices with the largest areas, this many.

    Returns
    -------
    dict
        ``hu_*`` and ``frac_*`` as :func:`first_order`; ``volume_ml``,
        ``extent_{z,y,x}_mm``, ``axis_{major,middle,minor}_mm`` (of the ellipsoid with
        the same second moments), ``elongation`` (middle/major), ``flatness``
        (minor/major), ``fill_ratio`` (volume over that ellipsoid's); ``glcm_*``
        (1 mm in-plane grid). All zeros for an empty mask.
    """
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {hu.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    out = first_order(hu[mask])
    out.update(_segment_shape(mask, spacing))
    out.update(_segment_glcm(hu, mask, spacing, glcm_window, max_glcm_slices))
    return {k: finite_or_zero(v) for k, v in out.items()}


def _segment_shape(mask: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    names = (
        "volume_ml",
        "extent_z_mm",
        "extent_y_mm",
        "extent_x_mm",
        "axis_major_mm",
        "axis_middle_mm",
        "axis_minor_mm",
        "elongation",
        "flatness",
        "fill_ratio",
    )
    coords = np.argwhere(mask)
    if coords.size == 0:
        return dict.fromkeys(names, 0.0)
    volume_mm3 = len(coords) * float(np.prod(spacing))
    extents = (coords.max(axis=0) - coords.min(axis=0) + 1) * spacing
    points = coords[:: max(1, len(coords) // 50_000)] * spacing
    eig = np.sort(np.linalg.eigvalsh(np.cov(points.T) if len(points) > 1 else np.zeros((3, 3))))[
        ::-1
    ]
    # A solid ellipsoid with semi-axis a has variance a² / 5 along it; a single slice
    # contributes its thickness as the third axis.
    axes = 2.0 * np.sqrt(5.0 * np.clip(eig, 0.0, None))
    axes = np.maximum(axes, spacing.min())
    major, middle, minor = (float(a) for a in axes)
    ellipsoid = math.pi / 6.0 * major * middle * minor
    return dict(
        zip(
            names,
            (
                volume_mm3 / 1000.0,
                *map(float, extents),
                major,
                middle,
                minor,
                middle / major if major else 0.0,
                minor / major if major else 0.0,
                min(volume_mm3 / ellipsoid, 10.0) if ellipsoid else 0.0,
            ),
            strict=True,
        )
    )


def _segment_glcm(
    hu: np.ndarray, mask: np.ndarray, spacing: np.ndarray, window: tuple[float, float], count: int
) -> dict[str, float]:
    areas = mask.sum(axis=(1, 2))
    picks = [int(k) for k in np.argsort(areas)[::-1][:count] if areas[k] > 0]
    images, masks = [], []
    for k in picks:
        box = bounding_box(mask[k])
        assert box is not None  # picks have an area
        size = (
            max(2, round((box[1].stop - box[1].start) * spacing[2] / SEGMENT_GRID_MM)),
            max(2, round((box[0].stop - box[0].start) * spacing[1] / SEGMENT_GRID_MM)),
        )
        image = cv2.resize(
            np.clip(hu[k][box], *HU_RANGE).astype(np.float32),
            size,
            interpolation=cv2.INTER_AREA
            if size[0] < box[1].stop - box[1].start
            else cv2.INTER_LINEAR,
        )
        m = cv2.resize(mask[k][box].astype(np.float32), size, interpolation=cv2.INTER_LINEAR) > 0.5
        images.append(image)
        masks.append(m)
    return glcm_features(images, masks, center=window[0], width=window[1], prefix="glcm")
