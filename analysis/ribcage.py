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
    ks = np.asarray(slices, dtype=int)
    # Many slices at once (numpy per call, not per slice), in chunks that bound the
    # rays' memory (slices x rays x radii).
    for start in range(0, ks.size, _CHUNK_SLICES):
        chunk = ks[start:start + _CHUNK_SLICES]
        out.update(zip(chunk.tolist(), _cages(bone[chunk], air[chunk], body[chunk],
                                              spacing_mm[1:]), strict=True))
    return {k: cage for k, cage in out.items() if cage is not None}


#: Slices whose rays are cast in one go (about 150 MB of ray samples at most).
_CHUNK_SLICES = 48
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _trunks(body: np.ndarray) -> np.ndarray:
    """Per slice, the largest 4-connected body component (all False where none)."""
    labels, n = ndimage.label(body, structure=_IN_PLANE)
    if n == 0:
        return np.zeros(body.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    slice_of = np.array([box[0].start for box in ndimage.find_objects(labels)])
    # Per slice the largest, the first in raster order among equals (as np.argmax).
    order = np.lexsort((-sizes, slice_of))
    first = order[np.r_[True, slice_of[order][1:] != slice_of[order][:-1]]]
    best = np.zeros(body.shape[0], dtype=labels.dtype)
    best[slice_of[first]] = first + 1
    return (labels == best[:, None, None]) & (best[:, None, None] > 0)


def _cages(bone: np.ndarray, air: np.ndarray, body: np.ndarray,
           spacing: tuple[float, float]) -> list[np.ndarray | None]:
    n, rows, cols = bone.shape
    trunk = _trunks(body)
    counts = trunk.sum(axis=(1, 2))
    has = counts > 0
    safe = np.maximum(counts, 1)
    cy = trunk.sum(axis=2) @ np.arange(rows) / safe
    cx = trunk.sum(axis=1) @ np.arange(cols) / safe
    angles = np.deg2rad(np.arange(0.0, 360.0, RAY_STEP_DEG))
    pixel = min(spacing)
    # Rays end where the farthest trunk pixel is: beyond it nothing is bone & trunk.
    reach = _reach(trunk, cy, cx, has)
    radii = np.arange(MIN_RADIUS_MM / pixel, min(max(rows, cols), reach + 2.0), 1.0)
    if radii.size == 0:  # a trunk smaller than MIN_RADIUS_MM: no cage to find
        return [None] * n
    rr = np.rint(cy[:, None, None] + np.outer(np.sin(angles), radii)[None]).astype(np.intp)
    cc = np.rint(cx[:, None, None] + np.outer(np.cos(angles), radii)[None]).astype(np.intp)
    # Samples off the slice read a pixel that is always False (the padding's last one).
    outside = (rr < 0) | (rr >= rows) | (cc < 0) | (cc >= cols)
    flat = np.where(outside, rows * cols, rr * cols + cc)
    flat += (np.arange(n) * (rows * cols + 1))[:, None, None]
    pad = np.zeros((n, 1), dtype=bool)
    hits = np.concatenate([(bone & trunk).reshape(n, -1), pad], axis=1).ravel()[flat]
    aired = np.concatenate([air.reshape(n, -1), pad], axis=1).ravel()[flat]
    # On a ray that crosses lung, only bone beyond the first lung pixel counts: the
    # heart and aorta with contrast (and calcified plaque) lie before it, the ribs after.
    crossed = np.maximum.accumulate(aired, axis=2)
    hits &= crossed | ~aired.any(axis=2, keepdims=True)
    found = hits.any(axis=2)
    first = np.where(found, radii[np.argmax(hits, axis=2)], np.nan)
    grow = max(1, int(round(MARGIN_MM / pixel)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    caged = has & (found.mean(axis=1) >= MIN_HIT_FRACTION)
    smoothed = _circular_median(first[caged]) if caged.any() else first[caged]
    out: list[np.ndarray | None] = [None] * n
    for k, smooth in zip(np.flatnonzero(caged), smoothed, strict=True):
        points = np.stack([cx[k] + np.cos(angles) * smooth, cy[k] + np.sin(angles) * smooth],
                          axis=1)
        cage = np.zeros((rows, cols), dtype=np.uint8)
        cv2.fillPoly(cage, [np.rint(points).astype(np.int32)], 1)
        out[k] = cv2.dilate(cage, kernel).astype(bool)
    return out


def _reach(trunk: np.ndarray, cy: np.ndarray, cx: np.ndarray, has: np.ndarray) -> float:
    """The farthest corner of any slice's trunk box from its centre (pooled pixels)."""
    if not has.any():
        return 0.0
    rows = trunk.any(axis=2)[has]
    cols = trunk.any(axis=1)[has]
    top, bottom = rows.argmax(axis=1), rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1), cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
    dy = np.maximum(cy[has] - top, bottom - cy[has])
    dx = np.maximum(cx[has] - left, right - cx[has])
    return float(np.hypot(dy, dx).max())


def _circular_median(radii: np.ndarray) -> np.ndarray:
    """Per row (a slice's rays), a circular low percentile over MEDIAN_RAYS rays ignoring
    rays without bone; a ray with none near it takes the linear interpolation of the
    nearest that have."""
    n, half = radii.shape[1], MEDIAN_RAYS // 2
    padded = np.concatenate([radii[:, -half:], radii, radii[:, :half]], axis=1)
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(padded, MEDIAN_RAYS, axis=1),
                      axis=2)
    # np.sort puts the rays without bone (NaN) last: index the percentile among the rest
    # (np.nanpercentile does the same, 50 times slower).
    count = np.count_nonzero(~np.isnan(windows), axis=2)
    index = np.floor(RADIUS_PERCENTILE / 100.0 * np.maximum(count - 1, 0)).astype(int)
    picked = np.take_along_axis(windows, index[..., None], axis=2)[..., 0]
    smooth = np.where(count > 0, picked, np.nan)
    for row in np.flatnonzero(np.isnan(smooth).any(axis=1)):
        known = np.flatnonzero(~np.isnan(smooth[row]))
        smooth[row] = np.interp(np.arange(n), known, smooth[row, known], period=n)
    return smooth
