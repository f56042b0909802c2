"""The rib cage: lung lies inside it.

Per slice, on the anatomy guard's pooled grid, rays are cast from the centre of the
trunk (the slice's largest body component: an arm that is a separate component is
left out) every ``RAY_STEP_DEG`` degrees; where a ray first meets bone (any source
pixel above ``BONE_HU``) is the cage's inner edge on that ray. Going outwards from the
centre, a rib, the spine or the sternum is met before any arm bone lying beyond the
chest wall, so the humerus and scapula do not widen the cage; on a ray that crosses
lung (below ``AIR_HU``), only bone beyond its first lung pixel counts (the heart and
aorta with contrast, which are brighter than ``BONE_HU``, lie before the lung). The radii are smoothed
with a circular low percentile (``RADIUS_PERCENTILE``) over ``MEDIAN_RAYS`` rays (a ray through an intercostal gap that
reaches the humerus, or one stopped early by a calcified vessel, is an outlier) and
rays without bone are filled from their neighbours; the polygon, grown by
``MARGIN_MM`` (lung bulges a little between ribs), is the cage.

A slice where fewer than ``MIN_HIT_FRACTION`` of the rays meet bone has no cage (above
the apex, below the costal margin, a limb, a skull): there, the cage rule does not
apply, and the skin-depth rule of :mod:`analysis.anatomy` is all that judges the lung.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

#: Bone (a rib on a 3 mm grid: any source pixel above it). Contrast-enhanced blood
#: (150-300 HU) lies before the lung on a ray, so the ray rule discards it.
BONE_HU = 200.0
RAY_STEP_DEG = 2.5
MEDIAN_RAYS = 15
#: The percentile of the window's radii taken: low, because the outliers that matter
#: lie outwards (rays through an intercostal gap reach the humerus or the scapula),
#: while those inwards (heart, aorta) are already discarded by the lung-crossing rule.
RADIUS_PERCENTILE = 20.0
MIN_HIT_FRACTION = 0.15
MARGIN_MM = 8.0
#: Rays start this far from the centre: the vertebral body is met by the posterior
#: rays anyway, and a bone right at the centre would stop every ray.
MIN_RADIUS_MM = 10.0
#: Lung-dark on the pooled grid (parenchyma about -850 HU, emphysema -950).
AIR_HU = -400.0


def cage_masks(bone: np.ndarray, air: np.ndarray, body: np.ndarray, slices: np.ndarray,
               spacing_mm: tuple[float, float, float]) -> dict[int, np.ndarray]:
    """Per slice in ``slices`` that has a cage, the cage on the pooled grid.

    Parameters
    ----------
    bone, air, body
        Pooled masks (slices, rows, columns); ``air`` is lung-dark (below ``AIR_HU``).
    slices
        The slice indices to judge (those holding lung).
    spacing_mm
        The pooled grid's spacing.
    """
    out: dict[int, np.ndarray] = {}
    for k in slices:
        cage = _cage(bone[k], air[k], body[k], spacing_mm[1:])
        if cage is not None:
            out[int(k)] = cage
    return out


def _trunk(body: np.ndarray) -> np.ndarray | None:
    labels, n = ndimage.label(body)
    if n == 0:
        return None
    return labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)


def _cage(bone: np.ndarray, air: np.ndarray, body: np.ndarray,
          spacing: tuple[float, float]) -> np.ndarray | None:
    trunk = _trunk(body)
    if trunk is None:
        return None
    cy, cx = np.argwhere(trunk).mean(axis=0)
    angles = np.deg2rad(np.arange(0.0, 360.0, RAY_STEP_DEG))
    pixel = min(spacing)
    radii = np.arange(MIN_RADIUS_MM / pixel, max(bone.shape), 1.0)
    rr = np.rint(cy + np.outer(np.sin(angles), radii)).astype(int)
    cc = np.rint(cx + np.outer(np.cos(angles), radii)).astype(int)
    inside = (rr >= 0) & (rr < bone.shape[0]) & (cc >= 0) & (cc < bone.shape[1])
    hits = np.zeros(rr.shape, dtype=bool)
    hits[inside] = (bone & trunk)[rr[inside], cc[inside]]
    aired = np.zeros(rr.shape, dtype=bool)
    aired[inside] = air[rr[inside], cc[inside]]
    # On a ray that crosses lung, only bone beyond the first lung pixel counts: the
    # heart and aorta with contrast (and calcified plaque) lie before it, the ribs after.
    crossed = np.maximum.accumulate(aired, axis=1)
    hits &= crossed | ~aired.any(axis=1, keepdims=True)
    found = hits.any(axis=1)
    if found.mean() < MIN_HIT_FRACTION:
        return None
    first = np.where(found, radii[np.argmax(hits, axis=1)], np.nan)
    smooth = _circular_median(first)
    points = np.stack([cx + np.cos(angles) * smooth, cy + np.sin(angles) * smooth], axis=1)
    cage = np.zeros(bone.shape, dtype=np.uint8)
    cv2.fillPoly(cage, [np.rint(points).astype(np.int32)], 1)
    grow = max(1, int(round(MARGIN_MM / pixel)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    return cv2.dilate(cage, kernel).astype(bool)


def _circular_median(radii: np.ndarray) -> np.ndarray:
    """A circular low percentile over MEDIAN_RAYS rays ignoring rays without bone; a ray with
    none near it takes the linear interpolation of the nearest that have."""
    n, half = radii.size, MEDIAN_RAYS // 2
    padded = np.concatenate([radii[-half:], radii, radii[:half]])
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(padded, MEDIAN_RAYS), axis=1)
    # np.sort puts the rays without bone (NaN) last: index the percentile among the rest
    # (np.nanpercentile does the same, 50 times slower).
    count = np.count_nonzero(~np.isnan(windows), axis=1)
    index = np.floor(RADIUS_PERCENTILE / 100.0 * np.maximum(count - 1, 0)).astype(int)
    smooth = np.where(count > 0, windows[np.arange(n), index], np.nan)
    known = np.flatnonzero(~np.isnan(smooth))
    if known.size < n:
        idx = np.arange(n)
        smooth = np.interp(idx, known, smooth[known], period=n)
    return smooth
