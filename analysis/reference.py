"""Reference lung masks: a documented threshold procedure, checked by eye afterwards.

This is not a segmenter for the node; it makes the *reference* that the node's
segmenters are scored against (``pacsnode reference``, then hand-checked corrections,
then ``pacsnode evaluate --reference``). Every step is simple enough to check on an
overlay, and every threshold is a named constant below. Input: Hounsfield units
``(slices, rows, columns)``, their spacing and the index -> patient (LPS) affine.

The procedure, in the order :func:`reference_lungs` runs it:

1. **Body.** :func:`analysis.segment.segment_body` (tissue above -500 HU, the largest
   3D component plus compact limbs, holes filled per slice; the table is left out).
2. **Air inside the body.** Voxels below ``AIR_HU`` (-400 HU: aerated lung is about
   -850, dense but aerated lung up to about -500, soft tissue above -100) inside the
   body. Per slice, air 4-connected to the air outside the body is removed (skin folds,
   the gap between an arm and the chest, an open mouth).
3. **Trachea and main bronchi.** Seeded in the top ``SEED_MM`` of the series (the
   slices nearest the head, from the affine): the darkest-median air component of
   ``SEED_MIN_CM2`` to ``SEED_MAX_CM2`` within ``SEED_MIDLINE_MM`` of the body's
   midline. From the seed, a 3D connected region of voxels below the growing threshold
   is grown at full resolution, for the thresholds ``AIRWAY_HU`` in turn (strictest
   last). The **leak check** rejects a region larger than ``MAX_AIRWAY_ML`` or with a
   slice of more than ``MAX_AIRWAY_SLICE_CM2`` (it has run into the lung
   parenchyma); the first threshold that passes wins, and if none passes nothing is
   removed and a note says so (the corrections then erase the airway by hand). The
   region is removed from the air, and with it **the rest of the lumen**: per slice, each
   in-plane air piece that touches the region and is at most ``WALL_MAX_FACTOR`` times
   its area there (the wall's partial volume and streak artefacts across the lumen lie
   above the growing threshold; on LIDC-IDRI-0314 they were 1-2 cm2 of "right lung" per
   slice from the neck down). Its intrapulmonary branches come back with the hole
   filling of step 6 wherever lung surrounds them.
4. **Gas is not lung.** A 3D air component (6-connected) whose median is below
   ``GAS_MEDIAN_HU`` is bowel or stomach gas (parenchyma has a median near -850 HU,
   emphysema rarely below -950) and is dropped.
5. **Left and right.** The lateral image axis and the patient's left (+x in LPS) come
   from the affine, so mirrored and prone series keep their sides. A component lying
   at least ``SIDE_FRACTION`` on one side of the body's midline (per slice, the
   centre of the body's lateral extent) is that side's. A component across the
   midline (the lungs touching at the anterior or posterior junction line) is cut,
   per slice, at the lateral position with the least lung within ``JUNCTION_MM`` of
   the midline: the junction itself.
6. **Vessels are lung.** Each lung's holes are filled per slice.
7. **Small pieces.** 3D pieces (6-connected) of each lung under ``MIN_PIECE_ML`` are
   dropped (noise, small airway remnants at the hilum).

What this cannot do (so the corrections exist): consolidation and dense lung above
-400 HU is left out, as are pleural effusions; gas of the oesophagus or a hiatus
hernia whose median is above ``GAS_MEDIAN_HU`` stays in; an airway the leak check
refused stays in. The result favours threshold-based segmenters (the classical one)
over the CNN by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from analysis.segment import _Lateral, _lateral, fill_holes_slicewise, segment_body

#: Air inside the body: below this.
AIR_HU = -400.0
#: The top of the series searched for a tracheal seed (mm from the top slice).
SEED_MM = 30.0
#: A tracheal section on a seed slice: its area and distance from the body's midline.
SEED_MIN_CM2 = 0.8
SEED_MAX_CM2 = 8.0
SEED_MIDLINE_MM = 25.0
#: Airway region growing thresholds, tried in turn (lumen air is about -1000 HU).
AIRWAY_HU = (-950.0, -975.0, -990.0)
#: Leak check: trachea plus main bronchi (and the branches that connect at the
#: threshold) are well under this volume, and under this area on any one slice.
MAX_AIRWAY_ML = 150.0
MAX_AIRWAY_SLICE_CM2 = 15.0
#: The lumen's own air above the growing threshold (its wall's partial volume, streaks
#: across it): an in-plane air piece touching the grown airway and at most this many
#: times the airway's area on that slice. Lung touching a main bronchus is tens of times
#: larger and stays.
WALL_MAX_FACTOR = 2.0
#: A 3D air component whose median is below this is gas (stomach, bowel), not lung.
GAS_MEDIAN_HU = -975.0
#: A component at least this fraction on one side of the midline is that side's.
SIDE_FRACTION = 0.9
#: Touching lungs are cut at the least-lung position within this of the midline.
JUNCTION_MM = 40.0
#: Lung pieces smaller than this are dropped.
MIN_PIECE_ML = 1.0

_SIX = ndimage.generate_binary_structure(3, 1)


@dataclass
class ReferenceLungs:
    """The procedure's masks, each of the volume's shape, and what it did."""

    left: np.ndarray
    right: np.ndarray
    body: np.ndarray
    airways: np.ndarray
    notes: list[str] = field(default_factory=list)


def reference_lungs(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                    affine: np.ndarray) -> ReferenceLungs:
    """Run the module's procedure on one volume.

    Parameters
    ----------
    hu
        ``(slices, rows, columns)`` Hounsfield units as stored (not denoised).
    spacing_mm
        ``(slice, row, column)`` spacing.
    affine
        4x4 index -> patient LPS; decides the top of the series and the patient's left.

    Returns
    -------
    ReferenceLungs
        Masks of ``hu``'s shape (all False where there is no lung) and notes.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    notes: list[str] = []
    body = segment_body(hu, spacing_mm)
    air = inside_air(hu, body)
    airways = grow_airways(hu, air, body, spacing_mm, affine, notes)
    airways |= airway_lumen(air, airways)
    air &= ~airways
    air = drop_gas(air, hu, notes)
    left, right = split_sides(air, body, affine, spacing_mm)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    left = drop_small(fill_holes_slicewise(left), voxel_ml)
    right = drop_small(fill_holes_slicewise(right), voxel_ml)
    right &= ~left  # hole filling may give a voxel to both where the lungs meet
    return ReferenceLungs(left=left, right=right, body=body, airways=airways, notes=notes)


def inside_air(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Air inside the body not connected, on its slice, to the air outside it."""
    air = hu < AIR_HU
    out = np.zeros(hu.shape, dtype=bool)
    for k in range(hu.shape[0]):
        if not (air[k] & body[k]).any():
            continue
        count, labels = cv2.connectedComponents(air[k].view(np.uint8), connectivity=4)
        outside = np.zeros(count, dtype=bool)
        outside[np.unique(labels[air[k] & ~body[k]])] = True
        outside[0] = True
        out[k] = ~outside[labels] & body[k]
    return out


def head_first_order(slices: int, affine: np.ndarray) -> np.ndarray:
    """Slice indices from the head down (LPS +z is superior)."""
    return np.arange(slices) if affine[2, 0] <= 0 else np.arange(slices)[::-1]


def grow_airways(hu: np.ndarray, air: np.ndarray, body: np.ndarray,
                 spacing_mm: tuple[float, float, float], affine: np.ndarray,
                 notes: list[str]) -> np.ndarray:
    """The trachea and main bronchi grown from a seed at the top (step 3)."""
    empty = np.zeros(hu.shape, dtype=bool)
    seed = find_seed(hu, air, body, spacing_mm, affine)
    if seed is None:
        return empty
    pixel_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    for threshold in AIRWAY_HU:
        candidate = (hu < threshold) & air
        labels, _ = ndimage.label(candidate, structure=_SIX)
        hit = np.unique(labels[seed & candidate])
        hit = hit[hit > 0]
        if hit.size == 0:
            continue
        region = np.isin(labels, hit)
        volume_ml = float(region.sum()) * voxel_ml
        widest_cm2 = float(region.sum(axis=(1, 2)).max()) * pixel_cm2
        if volume_ml <= MAX_AIRWAY_ML and widest_cm2 <= MAX_AIRWAY_SLICE_CM2:
            notes.append(f"airways grown below {threshold:.0f} HU: {volume_ml:.1f} mL")
            return region
    notes.append("airway growing leaked into the lung at every threshold: no airway removed")
    return empty


def airway_lumen(air: np.ndarray, airways: np.ndarray) -> np.ndarray:
    """The in-plane air pieces that touch the grown airway and are at most
    WALL_MAX_FACTOR times its area on their slice (the rest of its lumen)."""
    out = np.zeros(air.shape, dtype=bool)
    kernel = np.ones((3, 3), np.uint8)
    for k in np.flatnonzero(airways.any(axis=(1, 2))):
        rest = air[k] & ~airways[k]
        labels, n = ndimage.label(rest)
        if n == 0:
            continue
        grown = cv2.dilate(airways[k].view(np.uint8), kernel).astype(bool)
        touching = np.unique(labels[grown & rest])
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        limit = WALL_MAX_FACTOR * float(airways[k].sum())
        keep = [i for i in touching if i and sizes[i] <= limit]
        out[k] = np.isin(labels, keep)
    return out


def find_seed(hu: np.ndarray, air: np.ndarray, body: np.ndarray,
              spacing_mm: tuple[float, float, float], affine: np.ndarray) -> np.ndarray | None:
    """A tracheal section on one of the top slices, as a volume mask, or None."""
    lateral = _lateral(affine, spacing_mm)
    pixel_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    order = head_first_order(hu.shape[0], affine)
    top = order[: max(1, int(round(SEED_MM / abs(spacing_mm[0]))))]
    for k in top:
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(
            air[k].view(np.uint8), connectivity=4)
        if count < 2 or not body[k].any():
            continue
        positions = np.nonzero(body[k])[lateral.axis - 1]
        midline = 0.5 * (positions.min() + positions.max())
        best: tuple[float, int] | None = None
        for index in range(1, count):
            area = stats[index, cv2.CC_STAT_AREA] * pixel_cm2
            centre = centroids[index][1 if lateral.axis == 1 else 0]
            off_mm = abs(centre - midline) * lateral.spacing_mm
            if not SEED_MIN_CM2 <= area <= SEED_MAX_CM2 or off_mm > SEED_MIDLINE_MM:
                continue
            median = float(np.median(hu[k][labels == index]))
            if best is None or median < best[0]:
                best = (median, index)
        if best is not None:
            seed = np.zeros(hu.shape, dtype=bool)
            seed[k] = labels == best[1]
            return seed
    return None


def drop_gas(air: np.ndarray, hu: np.ndarray, notes: list[str]) -> np.ndarray:
    """Air components with a gas-like median are dropped (step 4)."""
    labels, count = ndimage.label(air, structure=_SIX)
    if count == 0:
        return air
    medians = ndimage.median(hu, labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], np.asarray(medians) >= GAS_MEDIAN_HU])
    dropped = int((~keep[1:]).sum())
    if dropped:
        notes.append(f"{dropped} gas component(s) (median below {GAS_MEDIAN_HU:.0f} HU) dropped")
    return keep[labels]


def split_sides(air: np.ndarray, body: np.ndarray, affine: np.ndarray,
                spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) by the patient's side of the midline, cut at the junction (step 5)."""
    lateral = _lateral(affine, spacing_mm)
    midline = body_midline(body, lateral.axis)
    shape = air.shape
    view = [1, 1, 1]
    view[lateral.axis] = shape[lateral.axis]
    position = np.arange(shape[lateral.axis]).reshape(view)
    high_side = np.broadcast_to(position > midline[:, None, None], shape)
    high = np.zeros(shape, dtype=bool)
    labels, count = ndimage.label(air, structure=_SIX)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        piece = labels[box] == index
        fraction = np.count_nonzero(piece & high_side[box]) / np.count_nonzero(piece)
        if fraction >= SIDE_FRACTION:
            high[box] |= piece
        elif fraction > 1.0 - SIDE_FRACTION:
            cut = junction(piece, midline[box[0]] - (box[lateral.axis].start or 0), lateral)
            local = np.arange(piece.shape[lateral.axis]).reshape(
                [piece.shape[lateral.axis] if a == lateral.axis else 1 for a in range(3)])
            high[box] |= piece & (local > cut[:, None, None])
    low = air & ~high
    return (high, low) if lateral.left_is_higher else (low, high)


def body_midline(body: np.ndarray, axis: int) -> np.ndarray:
    """Per slice, the centre of the body's lateral extent (index units)."""
    profile = body.any(axis=3 - axis)  # (slices, lateral)
    centre = np.full(body.shape[0], body.shape[axis] / 2.0)
    for k in np.flatnonzero(profile.any(axis=1)):
        where = np.flatnonzero(profile[k])
        centre[k] = 0.5 * (where[0] + where[-1])
    return centre


def junction(piece: np.ndarray, midline: np.ndarray, lateral: _Lateral) -> np.ndarray:
    """Per slice of ``piece``, the lateral index with the least lung near the midline."""
    axis = lateral.axis
    profile = piece.sum(axis=3 - axis)  # (slices, lateral)
    window = JUNCTION_MM / lateral.spacing_mm
    positions = np.arange(profile.shape[1])
    cut = np.asarray(midline, dtype=np.float64).copy()
    for k in range(profile.shape[0]):
        near = np.abs(positions - midline[k]) <= window
        if near.any():
            # The least lung wins; among equals, the position closest to the midline.
            score = profile[k] * 1e6 + np.abs(positions - midline[k])
            cut[k] = positions[near][np.argmin(score[near])]
    return cut


def drop_small(mask: np.ndarray, voxel_ml: float) -> np.ndarray:
    """The mask without 3D pieces under ``MIN_PIECE_ML`` (step 7)."""
    labels, count = ndimage.label(mask, structure=_SIX)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml
    keep = sizes >= MIN_PIECE_ML
    keep[0] = False
    return keep[labels]
