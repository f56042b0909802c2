"""Anatomy as a guard on the final lung masks, whichever segmenter made them.

A lung lies inside the thoracic cavity: inside the body, under the chest wall (never
at the skin), inside the rib cage (``analysis/ribcage.py``), above the diaphragm, filled
with parenchyma (not the bare -1000 HU of gas), never open to the air outside the body,
and on the patient's own side. Each connected piece of a lung mask that breaks one of
these rules is dropped, or moved to the other lung when it lies on the other side, and a
note says so (the node puts the notes into the SR). Before that, the trachea and main
bronchi (``analysis/airways.py``: the rule and its thresholds) are taken out of both
lungs: they are airways, not lung.

The pieces are found on a grid pooled to about 3 mm in-plane: labelling the 3D
components of a 512x512 series at full resolution costs about a second per lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from analysis import airways, ribcage
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT

#: Lung is never this close to the skin: the chest wall (skin, fat, muscle, ribs) is
#: thicker. A piece mostly within it is air in a skin fold, the axilla or outside.
MIN_DEPTH_MM = 10.0
#: Fraction of a piece within MIN_DEPTH_MM of the skin that makes it "at the skin".
MAX_SHALLOW_FRACTION = 0.5
#: Fraction of a piece outside the rib cage (``analysis/ribcage.py``; slices without a
#: cage count as inside) that drops it. Whole pieces, not voxels: the cage is a coarse
#: polygon through the ribs a slice happens to cut, and may clip real lung locally.
MAX_OUTSIDE_CAGE_FRACTION = 0.5
#: Below the diaphragm: a piece, not the lung's largest, whose top lies more than
#: APEX_MM below the top of its lung and which, over the ROOF_MM above its top, has no lung but tissue denser
#: than ROOF_HU (liver, spleen, the stomach's wall: the dome) over more than
#: MIN_ROOF_FRACTION of its footprint. A costophrenic recess runs upward into the lung
#: (it is part of the lung's piece, or has lung right above it), the apex has no lung
#: above it and lies at the top.
APEX_MM = 30.0
ROOF_MM = 10.0
ROOF_HU = -300.0
MIN_ROOF_FRACTION = 0.5
#: Open to the outside: where a piece lies on slices without a rib cage (a limb, the
#: neck), air it touches that reaches the air outside the body on at least this fraction
#: of its slices (the gap between two thighs, a skin fold the body mask closed over).
#: Real lung never touches outside air: the chest wall lies between.
MIN_OPEN_SLICE_FRACTION = 0.25
OPEN_AIR_HU = -400.0
#: How far around a piece the air is followed to the outside.
OPEN_SEARCH_MM = 20.0
#: Parenchyma has a median of about -850 HU (emphysema -950); gas about -1000.
GAS_MEDIAN_HU = -975.0
#: A piece whose centre lies this far across the body's midline is on the other side.
MIDLINE_MARGIN_MM = 10.0
#: Pieces smaller than this are left alone: the rules need a few voxels to judge.
MIN_PIECE_ML = 0.5
_POOLED_MM = 3.0
#: Pooling factors whose f bools fit one unsigned integer.
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class _Grid:
    """A pooled view of the source grid: ``factor`` source pixels per pooled pixel."""

    factor: int
    spacing_mm: tuple[float, float, float]

    def pool(self, mask: np.ndarray) -> np.ndarray:
        """True where any source pixel of the pooled pixel is."""
        f = self.factor
        if f == 1:
            return mask
        s, r, c = mask.shape
        if r % f == 0 and c % f == 0 and f in _WORDS:
            # f neighbouring columns read as one unsigned integer (non-zero where any is
            # set), then OR over f rows: three times faster than OpenCV per slice.
            words = np.ascontiguousarray(mask).view(_WORDS[f]).reshape(s, r // f, f, c // f)
            return np.bitwise_or.reduce(words, axis=2) != 0
        if r % f == 0 and c % f == 0:
            # Area averaging over whole f x f cells: non-zero where any pixel is set.
            # OpenCV does a 512x512 slice in well under a millisecond.
            size = (c // f, r // f)
            # (255 for set pixels, so one of f*f still averages above zero.)
            return np.stack([cv2.resize(mask[k].view(np.uint8) * np.uint8(255), size,
                                        interpolation=cv2.INTER_AREA) > 0 for k in range(s)])
        out = np.zeros((s, -(-r // f), -(-c // f)), dtype=bool)
        for i in range(f):
            for j in range(f):
                view = mask[:, i::f, j::f]
                out[:, :view.shape[1], :view.shape[2]] |= view
        return out

    def full_box(self, box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The source-grid box of a pooled box."""
        f = self.factor
        return (box[0], slice(box[1].start * f, min(box[1].stop * f, shape[1])),
                slice(box[2].start * f, min(box[2].stop * f, shape[2])))

    def expand(self, pooled: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        f = self.factor
        if f == 1:
            return pooled
        full = np.repeat(np.repeat(pooled, f, axis=1), f, axis=2)
        return full[:, :shape[1], :shape[2]]


def guard_lungs(masks: dict[str, np.ndarray], hu: np.ndarray,
                spacing_mm: tuple[float, float, float], affine: np.ndarray,
                notes: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The lung masks with every piece that cannot be lung dropped or moved.

    Parameters
    ----------
    masks
        Final masks by label; needs ``body``; ``lung_left``/``lung_right`` if present
        are checked. Other labels pass unchanged.
    hu, spacing_mm, affine
        The volume the masks are on.
    notes
        The notes so far; one is added per change.
    """
    lungs = [label for label in (LUNG_LEFT, LUNG_RIGHT) if label in masks]
    if BODY not in masks or not lungs or not any(masks[label].any() for label in lungs):
        return masks, notes
    factor = _factor(masks[BODY].shape, min(spacing_mm[1], spacing_mm[2]))
    grid = _Grid(factor, (spacing_mm[0], spacing_mm[1] * factor, spacing_mm[2] * factor))
    body = masks[BODY]
    pooled_body = grid.pool(body)
    deep = _deep_body(pooled_body, grid.spacing_mm)
    # Judged on the pooled grid: HU sampled, patient x of each pooled pixel.
    pooled_hu = hu[:, ::factor, ::factor]
    patient_x = _patient_x(affine, pooled_body.shape, factor)
    midline = _midline_x(pooled_body, patient_x)
    out, notes = dict(masks), list(notes)
    masks = _remove_airways(masks, lungs, hu, grid, pooled_body, affine, notes)
    moves: list[tuple[str, tuple[slice, ...], np.ndarray]] = []
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    pooled_ml = float(np.prod(grid.spacing_mm)) / 1000.0
    caged, has_cage = _caged(masks, lungs, hu, grid, pooled_body)
    all_lungs: np.ndarray | None = None  # both lungs at full resolution, when a rule needs it
    pooled_lungs = _pooled_union(grid, masks, lungs)
    head_step = -1 if affine[2, 0] <= 0 else 1  # LPS: +z is superior
    for label in lungs:
        mask = masks[label] & body  # never outside the body
        outside = np.count_nonzero(masks[label]) - np.count_nonzero(mask)
        if outside * voxel_ml >= MIN_PIECE_ML:
            notes.append(f"{label}: {outside * voxel_ml:.1f} mL outside the body removed")
        pooled_labels, _ = ndimage.label(grid.pool(mask), structure=_SIX_CONNECTED)
        sizes = np.bincount(pooled_labels.ravel())
        largest = int(np.argmax(sizes[1:])) + 1 if sizes.size > 1 else 0
        for index, box in enumerate(ndimage.find_objects(pooled_labels), start=1):
            if box is None or sizes[index] * pooled_ml < MIN_PIECE_ML:
                continue
            pooled_piece = pooled_labels[box] == index
            verdict = _judge(pooled_piece, deep[box], caged[box], pooled_hu[box],
                             patient_x[box[1:]], midline[box[0]], label)
            if verdict is None and index != largest:  # the lung itself is never "below"
                verdict = _under_dome(pooled_piece, box, pooled_lungs, pooled_hu, head_step,
                                      _top(pooled_labels > 0, head_step), grid.spacing_mm[0])
            cageless = verdict is None and has_cage[box[0]].mean() < 0.5
            if verdict is None and not cageless:
                continue
            full = grid.full_box(box, mask.shape)
            piece = grid.expand(pooled_piece, _shape(full)) & mask[full]
            if cageless:
                if all_lungs is None:
                    all_lungs = masks[lungs[0]] | masks[lungs[-1]]
                verdict = _open_to_outside(piece, full, hu, body, all_lungs,
                                           _source_spacing(grid))
            if verdict is None:
                continue
            ml = float(piece.sum()) * voxel_ml
            mask[full] &= ~piece
            if verdict == "other side":
                other = LUNG_RIGHT if label == LUNG_LEFT else LUNG_LEFT
                moves.append((other, full, piece))
                notes.append(f"{label}: a piece of {ml:.1f} mL lies on the patient's "
                             f"{'right' if label == LUNG_LEFT else 'left'}: moved to {other}")
            else:
                notes.append(f"{label}: a piece of {ml:.1f} mL dropped: {verdict}")
        out[label] = mask
    for other, full, piece in moves:
        if other in out:
            out[other][full] |= piece
    return out, notes


#: Full-resolution voxels next to the traced lumen darker than this are its edge.
AIRWAY_LUMEN_HU = -500.0


def _remove_airways(masks: dict[str, np.ndarray], lungs: list[str], hu: np.ndarray,
                    grid: _Grid, pooled_body: np.ndarray, affine: np.ndarray,
                    notes: list[str]) -> dict[str, np.ndarray]:
    """The masks without the trachea and main bronchi; a note when any lung was there."""
    f = grid.factor
    pooled_lung = _pooled_union(grid, masks, lungs)
    column = airways.find_airways(airways.pooled_mean(hu, f), pooled_body, pooled_lung,
                                  grid.spacing_mm, affine, f)
    if not column.any():
        return masks
    airway = airways.trace_airways(hu, column, f, _source_spacing(grid), affine)
    ks = np.flatnonzero(airway.any(axis=(1, 2)))
    if ks.size == 0:
        return masks
    # One pixel around the lumen (its partial-volume edge), where still air-dark; in
    # the trace's bounding box only (a fifth of the slice: the cost is in this box).
    rows = np.flatnonzero(airway.any(axis=(0, 2)))
    cols = np.flatnonzero(airway.any(axis=(0, 1)))
    full = (slice(ks[0], ks[-1] + 1), slice(max(0, rows[0] - 1), rows[-1] + 2),
            slice(max(0, cols[0] - 1), cols[-1] + 2))
    kernel = np.ones((3, 3), np.uint8)
    airway = np.stack([cv2.dilate(a.view(np.uint8), kernel).astype(bool)
                       for a in airway[full]]) & (hu[full] < AIRWAY_LUMEN_HU)
    out, removed = dict(masks), 0
    for label in lungs:
        hit = masks[label][full] & airway
        if hit.any():
            removed += int(hit.sum())
            out[label] = masks[label].copy()
            out[label][full] &= ~hit
    if removed * float(np.prod(grid.spacing_mm)) / f / f >= 50.0:  # 0.05 mL
        ml = removed * float(np.prod(grid.spacing_mm)) / 1000.0 / f / f
        notes.append(f"airways removed from lung: {ml:.1f} mL")
    return out


def _caged(masks: dict[str, np.ndarray], lungs: list[str], hu: np.ndarray, grid: _Grid,
           pooled_body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On the pooled grid: inside the rib cage, or on a slice without one; and which
    slices have one."""
    caged = np.ones(pooled_body.shape, dtype=bool)
    has_cage = np.zeros(pooled_body.shape[0], dtype=bool)
    for k, cage in _cages(masks, lungs, hu, grid, pooled_body).items():
        caged[k] = cage
        has_cage[k] = True
    return caged, has_cage


def _cages(masks: dict[str, np.ndarray], lungs: list[str], hu: np.ndarray, grid: _Grid,
           pooled_body: np.ndarray) -> dict[int, np.ndarray]:
    """The rib cage (pooled grid) of each slice holding lung that has one."""
    slices = np.flatnonzero(np.logical_or.reduce(
        [masks[label].any(axis=(1, 2)) for label in lungs]))
    if slices.size == 0:
        return {}
    # One contiguous block of slices: a view, not a copy of the HU.
    block = slice(int(slices[0]), int(slices[-1]) + 1)
    bone = np.zeros(pooled_body.shape, dtype=bool)
    bone[block] = grid.pool(hu[block] > ribcage.BONE_HU)
    f = grid.factor
    air = np.zeros(pooled_body.shape, dtype=bool)
    sampled = hu[block, ::f, ::f] < ribcage.AIR_HU
    air[block, :sampled.shape[1], :sampled.shape[2]] = sampled[:, :air.shape[1], :air.shape[2]]
    return ribcage.cage_masks(bone, air, pooled_body, slices, grid.spacing_mm)


def _pooled_union(grid: _Grid, masks: dict[str, np.ndarray], lungs: list[str]) -> np.ndarray:
    """Both lungs on the pooled grid: pooling each is cheaper than one full-size union."""
    pooled = [grid.pool(masks[label]) for label in lungs]
    return np.logical_or.reduce(pooled) if len(pooled) > 1 else pooled[0]


def _open_to_outside(piece: np.ndarray, box: tuple[slice, ...], hu: np.ndarray,
                     body: np.ndarray, lungs: np.ndarray,
                     spacing_mm: tuple[float, float, float]) -> str | None:
    """"open to the air outside the body" when, on at least MIN_OPEN_SLICE_FRACTION of
    its slices, the piece (full resolution, cut to ``box``) touches air that is no lung
    and reaches, in-plane within OPEN_SEARCH_MM, air outside the body. Slices where the
    piece meets the image edge are not counted (a field of view cutting the chest)."""
    rows, cols = hu.shape[1:]
    mr = int(round(OPEN_SEARCH_MM / spacing_mm[1]))
    mc = int(round(OPEN_SEARCH_MM / spacing_mm[2]))
    r0, r1 = max(0, box[1].start - mr), min(rows, box[1].stop + mr)
    c0, c1 = max(0, box[2].start - mc), min(cols, box[2].stop + mc)
    kernel = np.ones((3, 3), np.uint8)
    opened, counted = 0, 0
    for i, k in enumerate(range(box[0].start, box[0].stop)):
        own = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        own[box[1].start - r0:box[1].stop - r0, box[2].start - c0:box[2].stop - c0] = piece[i]
        if not own.any():
            continue
        edge = (r0 == 0 and own[0].any()) or (r1 == rows and own[-1].any()) or \
            (c0 == 0 and own[:, 0].any()) or (c1 == cols and own[:, -1].any())
        if edge:
            continue
        counted += 1
        air = (hu[k, r0:r1, c0:c1] < OPEN_AIR_HU) & ~lungs[k, r0:r1, c0:c1]
        labels, n = ndimage.label(air)
        outside = np.unique(labels[air & ~body[k, r0:r1, c0:c1]])
        reach = np.isin(labels, outside[outside > 0])
        if (cv2.dilate(reach.view(np.uint8), kernel).astype(bool) & own).any():
            opened += 1
    if counted == 0 or opened / counted < MIN_OPEN_SLICE_FRACTION:
        return None
    return (f"open to the air outside the body on {opened} of its {counted} slices "
            "(no rib cage there)")


def _source_spacing(grid: _Grid) -> tuple[float, float, float]:
    """The source grid's spacing, from the pooled one."""
    f = grid.factor
    return (grid.spacing_mm[0], grid.spacing_mm[1] / f, grid.spacing_mm[2] / f)


def _factor(shape: tuple[int, ...], pixel_mm: float) -> int:
    """Pooling to about 3 mm; a factor that divides the matrix pools fastest."""
    target = max(1, int(round(_POOLED_MM / pixel_mm)))
    dividing = [f for f in range(2, target + 1) if shape[1] % f == 0 and shape[2] % f == 0]
    return max(dividing) if dividing else target


def _shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(b.stop - b.start for b in box)


def _top(mask: np.ndarray, head_step: int) -> int:
    """The slice of ``mask`` nearest the head."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(ks[0] if head_step < 0 else ks[-1])


def _under_dome(piece: np.ndarray, box: tuple[slice, ...], lungs: np.ndarray,
                hu: np.ndarray, head_step: int, lung_top: int, dz: float) -> str | None:
    """"below the diaphragm" when a piece lies under a roof of tissue, well below its
    lung's top ``lung_top`` (pooled grid; ``piece`` is cut to ``box``, the rest is
    whole)."""
    top = box[0].start + _top(piece, head_step)
    if abs(top - lung_top) * dz <= APEX_MM:
        return None
    steps = max(1, int(round(ROOF_MM / dz)))
    roof = [top + head_step * i for i in range(1, steps + 1)]
    roof = [k for k in roof if 0 <= k < lungs.shape[0]]
    if not roof:  # the piece starts on the series' first slice: nothing to see above
        return None
    footprint = piece.any(axis=0)
    above_lung = lungs[roof][:, box[1], box[2]].any(axis=0)
    above_hu = hu[roof][:, box[1], box[2]].mean(axis=0)
    covered = footprint & ~above_lung & (above_hu > ROOF_HU)
    fraction = np.count_nonzero(covered) / max(np.count_nonzero(footprint), 1)
    if fraction <= MIN_ROOF_FRACTION:
        return None
    return (f"below the diaphragm ({fraction:.0%} of it under tissue, no lung in the "
            f"{ROOF_MM:g} mm above it)")


def _judge(piece: np.ndarray, deep: np.ndarray, caged: np.ndarray, hu: np.ndarray,
           patient_x: np.ndarray, midline: np.ndarray, label: str) -> str | None:
    """Why ``piece`` is not ``label``, or ``None`` when it may well be.

    Pooled-grid arrays cut to the piece's box (``caged``: inside the rib cage or on a
    slice without one); ``midline`` is the body's centre
    (patient x, mm) on each of the box's slices.
    """
    voxels = np.count_nonzero(piece)
    shallow = 1.0 - np.count_nonzero(piece & deep) / voxels
    if shallow > MAX_SHALLOW_FRACTION:
        # (Not "outside the rib cage": that is the cage rule's own note.)
        return f"{shallow:.0%} of it within {MIN_DEPTH_MM:g} mm of the skin"
    outside = 1.0 - np.count_nonzero(piece & caged) / voxels
    if outside > MAX_OUTSIDE_CAGE_FRACTION:
        return f"{outside:.0%} of it outside the rib cage"
    if float(np.median(hu[piece])) < GAS_MEDIAN_HU:
        return "bare gas (median below -975 HU), no lung parenchyma"
    per_slice = piece.sum(axis=(1, 2))
    body_x = float(np.average(midline, weights=per_slice))
    piece_x = float(np.average(np.broadcast_to(patient_x, piece.shape)[piece]))
    # LPS: +x is the patient's left.
    across = body_x - piece_x if label == LUNG_LEFT else piece_x - body_x
    if across > MIDLINE_MARGIN_MM:
        return "other side"
    return None


def _midline_x(body: np.ndarray, patient_x: np.ndarray) -> np.ndarray:
    """Per slice, the mean patient x of the body (its overall mean where it is empty)."""
    counts = body.sum(axis=(1, 2))
    sums = np.array([float(patient_x[k_body].sum()) for k_body in body])
    overall = float(sums.sum() / max(counts.sum(), 1))
    return np.where(counts > 0, sums / np.maximum(counts, 1), overall)


def _deep_body(body: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Per slice, the body without its outer MIN_DEPTH_MM."""
    ry = max(1, int(round(MIN_DEPTH_MM / spacing_mm[1])))
    rx = max(1, int(round(MIN_DEPTH_MM / spacing_mm[2])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rx + 1, 2 * ry + 1))
    out = np.empty_like(body)
    for k in range(body.shape[0]):
        out[k] = cv2.erode(body[k].view(np.uint8), kernel, borderValue=0).astype(bool)
    return out


def _patient_x(affine: np.ndarray, shape: tuple[int, ...], factor: int) -> np.ndarray:
    """The patient x (LPS, mm) of each pooled in-plane pixel, on the middle slice."""
    rows, columns = np.meshgrid(np.arange(shape[1]) * factor, np.arange(shape[2]) * factor,
                                indexing="ij")
    return affine[0, 0] * (shape[0] // 2) + affine[0, 1] * rows + affine[0, 2] * columns \
        + affine[0, 3]
