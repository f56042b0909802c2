"""Classical CT segmentation: body outline and left/right lungs from Hounsfield units.

The approach, in the order the functions run:

* body: tissue above about -500 HU, opened slice-wise so thin bridges (table shell,
  cables, blankets) break off, the largest 3D component plus any other large compact
  one (arms), holes filled per slice.
* lungs: air-like voxels inside the body grouped into 3D components. Gas in the
  stomach and bowel is also air inside the body, often on the same slices as the
  lung bases; it is told apart per component: too small for a lung relative to the
  body, or gas-like (median near -1000 HU) where lung parenchyma is about -850 HU
  (partial volume of its vessels and septa; see :func:`_looks_like_lung`). The
  trachea and main bronchi (small, dark, central 2D sections) are cut away, the
  lungs split at the midline if they touch, and each side assigned by patient x
  through the affine (patient left is +x in LPS) rather than by image side. Each lung
  is then closed and hole-filled per slice (vessels), and dense lung against the
  chest wall is brought back by filling the lung's lateral concavities, within
  bounds (:func:`_fill_dense_pleura`).

Everything works on ``(slices, rows, columns)`` arrays and their spacing; 2D steps
use OpenCV per slice, which on a 2-core machine is much faster than 3D morphology.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0
AIR_THRESHOLD_HU = -400.0
#: Lung components smaller than this fraction of the body volume are not lungs.
MIN_LUNG_FRACTION_OF_BODY = 0.015
#: Gas is about -1000 HU (-950 at worst with noise and partial volume); aerated lung
#: has a median near -850, emphysematous lung rarely below -930.
LUNG_MEDIAN_HU = -930.0
#: Between this and LUNG_MEDIAN_HU only a large component with vessels is lung.
EMPHYSEMA_MEDIAN_HU = -960.0
#: ... "large" meaning this fraction of the body, "with vessels" this fraction of its
#: filled outline dense.
EMPHYSEMA_MIN_FRACTION_OF_BODY = 0.05
MIN_VESSEL_FRACTION = 0.01
#: Closing and hull filling never add voxels this dense (bone, contrast) to a lung.
MAX_LUNG_TISSUE_HU = 250.0
#: Trachea and main bronchi are pure air: their 2D sections average below this.
AIRWAY_MEAN_HU = -930.0

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class _Lateral:
    """Which in-plane axis runs left-right in the patient, and which way."""

    axis: int  # 1 (rows) or 2 (columns) of the volume
    left_is_higher: bool  # patient left (+x) at higher indices along ``axis``
    spacing_mm: float


# ---------------------------------------------------------------------------- helpers


def _disc(radius_px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def _radius_px(radius_mm: float, spacing_mm: tuple[float, float, float]) -> int:
    return max(1, int(round(radius_mm / min(spacing_mm[1], spacing_mm[2]))))


def morph_slicewise(mask: np.ndarray, operation: int, radius_px: int) -> np.ndarray:
    """Apply an OpenCV morphology (``cv2.MORPH_*``) with a disc to each slice of a mask.

    Closing pads the slice first so that shapes touching the image edge are not
    eroded from outside it.
    """
    kernel = _disc(radius_px)
    source = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    out = np.empty(mask.shape, dtype=np.uint8)
    pad = radius_px + 1
    for k in range(mask.shape[0]):
        if operation == cv2.MORPH_CLOSE:
            padded = np.pad(source[k], pad)
            out[k] = cv2.morphologyEx(padded, operation, kernel)[pad:-pad, pad:-pad]
        else:
            out[k] = cv2.morphologyEx(np.ascontiguousarray(source[k]), operation, kernel)
    return out.view(bool)


def fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """Fill, in each slice, background not connected (4-connected) to the slice's edge."""
    out = np.empty(mask.shape, dtype=bool)
    rows, columns = mask.shape[1:]
    flood_mask = np.zeros((rows + 4, columns + 4), dtype=np.uint8)
    for k in range(mask.shape[0]):
        padded = np.zeros((rows + 2, columns + 2), dtype=np.uint8)
        padded[1:-1, 1:-1] = mask[k]
        flood_mask[:] = 0
        cv2.floodFill(padded, flood_mask, (0, 0), 2)
        out[k] = padded[1:-1, 1:-1] != 2
    return out


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """The smallest box holding a mask's True (non-zero) voxels, as slices.

    Parameters
    ----------
    mask
        Any number of dimensions.
    margin
        Voxels added on both sides, the same along every axis or one per axis; the box
        is clipped to the array.

    Returns
    -------
    tuple of slice or None
        None for an empty mask.
    """
    box = _tight_box(np.asarray(mask, dtype=bool))
    if box is None:
        return None
    grow = (margin,) * mask.ndim if isinstance(margin, int) else tuple(margin)
    return tuple(
        slice(max(0, s.start - m), min(n, s.stop + m))
        for s, m, n in zip(box, grow, mask.shape, strict=True)
    )


def _tight_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """``find_objects`` of a bool mask, on its projections beyond two dimensions.

    ``find_objects`` visits every voxel (0.12 s for a 200x512x512 CT mask, measured);
    a box is the first axis' extent of the projection onto it plus the box of the
    projection along it, and numpy's ``any`` makes those in 5 ms.
    """
    if mask.ndim <= 2:
        found = ndimage.find_objects(mask.view(np.uint8))
        return found[0] if found else None
    first = _tight_box(mask.any(axis=tuple(range(1, mask.ndim))))
    rest = _tight_box(mask.any(axis=0)) if first is not None else None
    return None if first is None or rest is None else (*first, *rest)


def _lateral(affine: np.ndarray, spacing_mm: tuple[float, float, float]) -> _Lateral:
    axis = 1 if abs(affine[0, 1]) > abs(affine[0, 2]) else 2
    left_is_higher = bool(affine[0, axis] > 0)
    return _Lateral(axis=axis, left_is_higher=left_is_higher, spacing_mm=spacing_mm[axis])


# ------------------------------------------------------------------------------- body


def segment_body(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    threshold_hu: float = BODY_THRESHOLD_HU,
) -> np.ndarray:
    """The patient's body outline, lungs and other internal air included.

    Parameters
    ----------
    hu
        ``(slices, rows, columns)`` Hounsfield units, denoised or not.
    spacing_mm
        Voxel spacing ``(slice, row, column)``.
    threshold_hu
        Tissue is above this; air, foam pads and most of the table's core are below.

    Returns
    -------
    numpy.ndarray
        bool mask of ``hu``'s shape; all False when nothing exceeds the threshold.
    """
    tissue = hu > threshold_hu
    # Opening breaks structures under ~4 mm thick (table shell, cables, blankets) away
    # from the body; a wider disc would also break a thin chest wall, and the lungs
    # behind it would then be "outside". On grids too coarse for a 2 mm disc there
    # is nothing that thin to break.
    radius = int(round(2.0 / min(spacing_mm[1], spacing_mm[2])))
    opened = morph_slicewise(tissue, cv2.MORPH_OPEN, radius) if radius else tissue
    kept = _body_components(opened)
    if kept is None:
        return np.zeros(hu.shape, dtype=bool)
    if radius:
        # Give back the skin and small protrusions the opening trimmed, nothing further.
        kept = morph_slicewise(kept, cv2.MORPH_DILATE, radius) & tissue
    return fill_holes_slicewise(kept)


def _body_components(opened: np.ndarray) -> np.ndarray | None:
    """The largest 3D component, plus large compact ones (arms); never flat slabs."""
    labels, count = ndimage.label(opened, structure=_SIX_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    keep = np.zeros(count + 1, dtype=bool)
    keep[largest] = True
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if index != largest and box is not None and sizes[index] >= 0.02 * sizes[largest]:
            keep[index] = _is_compact(sizes[index], box)
    return keep[labels]


def _is_compact(voxels: int, box: tuple[slice, ...]) -> bool:
    """A limb fills much of its box and is about as wide as deep; a table is a flat slab."""
    extents = [s.stop - s.start for s in box]
    aspect = max(extents[1], extents[2]) / max(1, min(extents[1], extents[2]))
    return aspect <= 4.0 and voxels >= 0.3 * float(np.prod(extents))


# ------------------------------------------------------------------------------ lungs


def segment_lungs(
    hu: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float, float],
    affine: np.ndarray,
    *,
    air_threshold_hu: float = AIR_THRESHOLD_HU,
    min_fraction_of_body: float = MIN_LUNG_FRACTION_OF_BODY,
) -> tuple[np.ndarray, np.ndarray]:
    """The patient's left and right lungs.

    Parameters
    ----------
    hu
        ``(slices, rows, columns)`` Hounsfield units, preferably lightly denoised.
    body
        The body mask from :func:`segment_body` (holes filled, so lungs are inside).
    spacing_mm
        Voxel spacing ``(slice, row, column)``.
    affine
        4x4 index -> patient LPS matrix; decides which lung is the patient's left.
    air_threshold_hu
        Aerated lung is below this (e.g. from :func:`kmeans_air_threshold`).
    min_fraction_of_body
        Air components smaller than this fraction of the body are never lungs.

    Returns
    -------
    left, right
        bool masks of ``hu``'s shape; all False where no lung was found (an abdomen).
    """
    empty = np.zeros(hu.shape, dtype=bool)
    box = bounding_box(body, margin=(0, 1, 1))  # in-plane: the steps below are per slice
    if box is None:
        return empty, empty.copy()
    hu_c, body_c = hu[box], body[box]
    lateral = _lateral(affine, spacing_mm)
    inner = morph_slicewise(body_c, cv2.MORPH_ERODE, 1)
    air = (hu_c < air_threshold_hu) & inner
    body_voxels = int(np.count_nonzero(body_c))
    min_voxels = max(1, int(min_fraction_of_body * body_voxels))
    lungs = _lung_components(air, hu_c, body_voxels, min_fraction_of_body, air_threshold_hu)
    if not lungs.any():
        return empty, empty.copy()
    midline = _midline(body_c, lateral)
    lungs &= ~_central_airways(lungs, hu_c, midline, lateral, spacing_mm)
    sides = _split_sides(lungs, midline, lateral, min_voxels // 4)
    allowed = inner & (hu_c < MAX_LUNG_TISSUE_HU)
    left, right = (_refine(mask, allowed, midline, lateral, spacing_mm) for mask in sides)
    left &= ~right  # only possible in the few voxels closing added on both sides
    return _uncrop(left, box, hu.shape), _uncrop(right, box, hu.shape)


def _uncrop(mask: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[box] = mask
    return out


def _lung_components(
    air: np.ndarray, hu: np.ndarray, body_voxels: int, min_fraction: float, threshold: float
) -> np.ndarray:
    """Air components big enough for a lung and textured like one, not like gas."""
    labels, count = ndimage.label(air, structure=_SIX_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None and sizes[index] >= min_fraction * body_voxels:
            large = sizes[index] >= EMPHYSEMA_MIN_FRACTION_OF_BODY * body_voxels
            keep[index] = _looks_like_lung(labels[box] == index, hu[box], threshold, large)
    return keep[labels]


def _looks_like_lung(component: np.ndarray, hu: np.ndarray, threshold: float, large: bool) -> bool:
    """Parenchyma (about -850 HU, with vessels) versus gas (-1000 HU, nothing inside).

    Vessels alone are weak evidence: after downsampling and denoising, small vessels
    blur into the parenchyma, while pockets of gas in bone (sinuses, mastoids, a dry
    skull phantom) enclose dense septa. So they only decide the borderline band.
    """
    median = float(np.median(hu[component]))
    if median > LUNG_MEDIAN_HU:
        return True
    if median <= EMPHYSEMA_MEDIAN_HU or not large:
        return False
    filled = fill_holes_slicewise(component)
    vessels = np.count_nonzero(filled & ~component & (hu >= threshold))
    return vessels >= MIN_VESSEL_FRACTION * np.count_nonzero(filled)


def _midline(body: np.ndarray, lateral: _Lateral) -> np.ndarray:
    """Per slice, the body's centre along the lateral axis (index units, float)."""
    other = 2 if lateral.axis == 1 else 1
    profile = body.sum(axis=other, dtype=np.int64)  # (slices, lateral)
    weights = profile.sum(axis=1)
    positions = np.arange(profile.shape[1], dtype=np.float64)
    centre = (profile @ positions) / np.maximum(weights, 1)
    if not weights.any():
        return centre
    # Slices without body (rare: a gap in the mask) take the volume's mean centre.
    fallback = float(np.average(centre[weights > 0], weights=weights[weights > 0]))
    return np.where(weights > 0, centre, fallback)


def _lateral_index(shape: tuple[int, ...], lateral: _Lateral) -> np.ndarray:
    """Broadcastable array of each voxel's index along the lateral axis."""
    view = [1, 1, 1]
    view[lateral.axis] = shape[lateral.axis]
    return np.arange(shape[lateral.axis]).reshape(view)


def _central_airways(
    lungs: np.ndarray, hu: np.ndarray, midline: np.ndarray, lateral: _Lateral,
    spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """Trachea and main bronchi: small, air-dark 2D sections near the midline.

    They would otherwise join both lungs into one component and be counted as lung.
    """
    pixel_area = spacing_mm[1] * spacing_mm[2]
    max_area_px = 600.0 / pixel_area  # 6 cm2; a trachea is about 3
    near_px = 25.0 / lateral.spacing_mm
    airways = np.zeros(lungs.shape, dtype=bool)
    for k in np.flatnonzero(lungs.any(axis=(1, 2))):
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(
            lungs[k].view(np.uint8), connectivity=4
        )
        for index in range(1, count):
            if stats[index, cv2.CC_STAT_AREA] > max_area_px:
                continue
            position = centroids[index][1 if lateral.axis == 1 else 0]
            if abs(position - midline[k]) > near_px:
                continue
            section = labels == index
            if float(np.mean(hu[k][section])) < AIRWAY_MEAN_HU:
                airways[k] |= section
    return airways


def _split_sides(
    lungs: np.ndarray, midline: np.ndarray, lateral: _Lateral, min_voxels: int
) -> tuple[np.ndarray, np.ndarray]:
    """(left, right): whole components by side of the midline, or cut if they cross it."""
    labels, _ = ndimage.label(lungs, structure=_SIX_CONNECTED)
    position = _lateral_index(lungs.shape, lateral)
    higher_side = np.broadcast_to(position > midline[:, None, None], lungs.shape)
    high = np.zeros(lungs.shape, dtype=bool)
    low = np.zeros(lungs.shape, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        voxels = np.count_nonzero(component)
        if voxels < min_voxels:
            continue  # airway remnants and the like
        above = np.count_nonzero(component & higher_side[box]) / voxels
        if 0.1 < above < 0.9:
            cut = _cut_positions(component, midline[box[0]] - _start(box, lateral.axis), lateral)
            cut_side = _lateral_index(component.shape, lateral) > cut[:, None, None]
            high[box] |= component & cut_side
            low[box] |= component & ~cut_side
        elif above >= 0.9:
            high[box] |= component
        else:
            low[box] |= component
    return (high, low) if lateral.left_is_higher else (low, high)


def _start(box: tuple[slice, ...], axis: int) -> int:
    return int(box[axis].start or 0)


def _cut_positions(component: np.ndarray, midline: np.ndarray, lateral: _Lateral) -> np.ndarray:
    """Per slice, where two touching lungs are thinnest near the midline.

    The anterior and posterior junction lines, where the lungs meet, are a few
    millimetres from the midline; the cut is the least-lung position within 40 mm.
    """
    other = 2 if lateral.axis == 1 else 1
    profile = component.sum(axis=other)  # (slices, lateral)
    window = int(round(40.0 / lateral.spacing_mm))
    positions = np.arange(profile.shape[1])
    cut = np.empty(profile.shape[0], dtype=np.float64)
    for k in range(profile.shape[0]):
        near = np.abs(positions - midline[k]) <= window
        if not near.any():
            cut[k] = midline[k]
            continue
        # Least lung wins; among equals, the position closest to the midline.
        score = profile[k] * 1e6 + np.abs(positions - midline[k])
        cut[k] = positions[near][np.argmin(score[near])]
    return cut


def _refine(
    lung: np.ndarray, allowed: np.ndarray, midline: np.ndarray, lateral: _Lateral,
    spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """Close, bring back dense pleural lung, fill holes; within the lung's box only."""
    grow = _radius_px(10.0, spacing_mm) + 2
    box = bounding_box(lung, margin=(0, grow, grow))
    if box is None:
        return lung
    part = lung[box]
    closed = morph_slicewise(part, cv2.MORPH_CLOSE, _radius_px(6.0, spacing_mm)) & allowed[box]
    closed |= part
    offset = _start(box, lateral.axis)
    dense = _fill_dense_pleura(closed, allowed[box], midline[box[0]] - offset, lateral)
    out = np.zeros(lung.shape, dtype=bool)
    # Enclosed holes are lung whatever their density (contrast-filled vessels, nodules).
    out[box] = fill_holes_slicewise(closed | dense)
    return out


def _fill_dense_pleura(
    lung: np.ndarray, allowed: np.ndarray, midline: np.ndarray, lateral: _Lateral
) -> np.ndarray:
    """Concavities of the lung's outline on its lateral side: dense lung at the pleura.

    Ground glass and consolidation against the chest wall are not air, so thresholds
    leave a bite in the lung there. The convex hull of each 2D lung section fills it;
    hull regions are only accepted when they lie lateral to the section's centre
    (medial concavities hold the heart and hilum) and are small relative to the section
    (a crescent-shaped lung base wraps around the liver dome, which is not lung).
    """
    out = np.zeros(lung.shape, dtype=bool)
    for k in np.flatnonzero(lung.any(axis=(1, 2))):
        section = lung[k].view(np.uint8)
        contours, _ = cv2.findContours(section, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            area = cv2.contourArea(contour)
            if area < 20:
                continue
            hull = np.zeros_like(section)
            cv2.fillPoly(hull, [cv2.convexHull(contour)], 1)
            concavity = (hull > 0) & (section == 0) & allowed[k]
            out[k] |= _lateral_bites(concavity, contour, area, midline[k], lateral)
    return out


def _lateral_bites(
    concavity: np.ndarray, contour: np.ndarray, area: float, midline: float, lateral: _Lateral
) -> np.ndarray:
    """Hull regions lateral to the section's centre and under 30 % of its area."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        concavity.view(np.uint8), connectivity=4
    )
    moments = cv2.moments(contour)
    first_moment = moments["m01"] if lateral.axis == 1 else moments["m10"]
    section_centre = first_moment / max(moments["m00"], 1e-9)
    out = np.zeros(concavity.shape, dtype=bool)
    for index in range(1, count):
        if stats[index, cv2.CC_STAT_AREA] > 0.3 * area:
            continue
        centre = centroids[index][1 if lateral.axis == 1 else 0]
        if abs(centre - midline) > abs(section_centre - midline):
            out |= labels == index
    return out


# ---------------------------------------------------------------------------- k-means


def kmeans_segment(
    hu: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    max_samples: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster intensities into ``k`` classes (OpenCV k-means on a sample of voxels).

    Parameters
    ----------
    hu
        Any-shaped intensity array.
    k
        Number of classes, 2 to 255.
    mask
        Only voxels inside it train the centres; every voxel is still labelled.
    max_samples
        Training voxels are subsampled to at most this many: the centres of a 1D
        intensity distribution are settled long before millions of samples.
    seed
        Makes the sampling and OpenCV's initialisation repeatable.

    Returns
    -------
    labels
        uint8 array of ``hu``'s shape, 0 for the darkest class up to ``k - 1``.
    centres
        float32 ``(k,)`` class centres in ascending order.
    """
    if not 2 <= k <= 255:
        raise ValueError(f"k must be between 2 and 255, got {k}")
    values = hu[mask] if mask is not None else hu.ravel()
    if values.size < k:
        raise ValueError(f"need at least {k} voxels to form {k} classes, got {values.size}")
    rng = np.random.default_rng(seed)
    if values.size > max_samples:
        values = values[rng.integers(0, values.size, max_samples)]  # no permutation of millions
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 100, 0.01)
    samples = values.astype(np.float32).reshape(-1, 1)
    _, _, centres = cv2.kmeans(samples, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    centres = np.sort(centres.ravel())
    # 1D nearest-centre assignment is a search among the midpoints.
    labels = np.searchsorted((centres[1:] + centres[:-1]) / 2.0, hu).astype(np.uint8)
    return labels, centres


def kmeans_air_threshold(hu: np.ndarray, body: np.ndarray, *, seed: int = 0) -> float:
    """An air/tissue threshold for :func:`segment_lungs` from two k-means classes in the body.

    Clamped to -600..-300 HU: without lungs the two classes are fat and soft tissue,
    whose midpoint would make fat look like air.
    """
    if np.count_nonzero(body) < 2:
        return AIR_THRESHOLD_HU
    _, centres = kmeans_segment(hu, 2, mask=body, seed=seed)
    return float(np.clip((centres[0] + centres[1]) / 2.0, -600.0, -300.0))
