"""The trachea and main bronchi: airways, not lung.

The rule, on a grid pooled to about 3 mm in-plane (the anatomy guard's grid; the HU
are averaged over each pooled pixel, so parenchyma at about -850 HU stays above the
threshold while an airway lumen, about -1000 HU, stays below it):

1. **Seed.** In the top ``SEED_MM`` of the series (the slices nearest the head, from the
   geometry, whichever way they are stored), a component of gas (pooled HU below
   ``GAS_HU``) inside the body, of ``MIN_AREA_CM2`` to ``MAX_AREA_CM2`` in area,
   whose centre lies within ``MIDLINE_MM`` of the body's midline and in the front
   ``MAX_ANTERIOR_FRACTION`` of the body (the trachea is in front of the spine and the
   oesophagus). The series must reach the apex: the lung (the candidate mask given)
   on the seed slice is at most ``APEX_FRACTION`` of its largest slice, and that slice
   lies below the seed.
2. **Trachea.** Slice by slice downward, the gas components that touch the column so
   far (on the slice above, grown by one pooled pixel). One component no larger than
   ``WIDEN_FACTOR`` times the trachea's median area continues the trachea.
3. **Carina.** Two components: the main bronchi. Each is followed the same way for
   ``BRONCHUS_MM`` more (a branch stops where it widens beyond ``WIDEN_FACTOR`` times
   its own first area or splits again: that is lobar bronchi or lung).
4. **Stop.** Where the column widens into lung, splits into more than two branches, or
   disappears, nothing more is taken.

A column shorter than ``MIN_LENGTH_MM`` is not a trachea (so a single slice, a limb or
an abdominal slice with a round gas pocket gives nothing).

The pooled column finds the trachea; its outline is then traced at full in-plane
resolution (:func:`trace_airways`), because at 3 mm the lumen's wall blurs into the
mediastinum and a branch off the trachea (on LIDC-IDRI-0314 the right upper lobe
bronchus, 13 mm above the carina) already reads as the carina:

5. **Seed.** On the column's top slice, the full-resolution lumen (HU below
   ``LUMEN_HU``) that overlaps the column.
6. **Grow.** Slice by slice downward, the lumen within ``STEP_MM`` of the airway on the
   slice above that touches it (region growing confined to the airway's own
   neighbourhood: a slice can add at most ``STEP_MM`` around the one above), then
   the whole in-plane lumen components it belongs to (a bronchus leaving in-plane)
   unless they pass the leak limit below, all within ``SEARCH_MM`` of the column.
7. **Leak check.** A slice whose airway exceeds ``LEAK_FACTOR`` times the trachea's
   median area (on the column's slices) has leaked into lung: tracing stops above it.
8. **Carina.** The first slice with two or more components each at least
   ``BRANCH_FRACTION`` of the trachea's area; the bronchi are traced ``BRONCHUS_MM``
   further, then tracing stops.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

GAS_HU = -900.0
SEED_MM = 30.0
MIN_AREA_CM2 = 0.8
MAX_AREA_CM2 = 8.0
MIDLINE_MM = 25.0
MAX_ANTERIOR_FRACTION = 0.65
APEX_FRACTION = 0.6
WIDEN_FACTOR = 2.5
BRONCHUS_MM = 25.0
MIN_LENGTH_MM = 20.0
#: Full resolution: an airway lumen is about -1000 HU; parenchyma about -850.
LUMEN_HU = -900.0
#: Growth allowed per slice around the airway above (the bronchi diverge at about 45
#: degrees, so at most about one slice thickness per slice; 3 mm covers 1-3 mm slices).
STEP_MM = 3.0
#: An airway slice larger than this times the trachea's median area has leaked into lung.
LEAK_FACTOR = 3.0
#: Each branch at the carina is at least this fraction of the trachea's area (a main
#: bronchus is about half of it; a noise speck or a pocket of partial volume is not).
BRANCH_FRACTION = 0.15


def pooled_mean(hu: np.ndarray, factor: int) -> np.ndarray:
    """HU averaged over factor x factor cells (edges cut to whole cells)."""
    if factor == 1:
        return hu.astype(np.float32, copy=False)
    s, r, c = hu.shape
    size = (c // factor, r // factor)
    return np.stack([cv2.resize(np.ascontiguousarray(hu[k], dtype=np.float32), size,
                                interpolation=cv2.INTER_AREA) for k in range(s)])


def find_airways(pooled_hu: np.ndarray, body: np.ndarray, lung: np.ndarray,
                 pooled_spacing_mm: tuple[float, float, float], affine: np.ndarray,
                 factor: int) -> np.ndarray:
    """The trachea and main bronchi on the pooled grid (all False when there is none).

    ``pooled_hu``, ``body`` and ``lung`` are on the same pooled grid (``body`` and
    ``lung`` may be a few rows/columns larger: they are cut to ``pooled_hu``).
    """
    s, r, c = pooled_hu.shape
    body, lung = body[:, :r, :c], lung[:, :r, :c]
    out = np.zeros((s, r, c), dtype=bool)
    dz = abs(pooled_spacing_mm[0])
    if s * dz < MIN_LENGTH_MM or not body.any():
        return out
    # LPS: +z is superior. Order the slices head first.
    order = np.arange(s) if affine[2, 0] <= 0 else np.arange(s)[::-1]
    pixel_cm2 = pooled_spacing_mm[1] * pooled_spacing_mm[2] / 100.0
    rows, cols = np.meshgrid(np.arange(r) * factor, np.arange(c) * factor, indexing="ij")
    px = affine[0, 1] * rows + affine[0, 2] * cols
    py = affine[1, 1] * rows + affine[1, 2] * cols
    gas = (pooled_hu < GAS_HU) & body
    lung_area = lung.sum(axis=(1, 2))
    seed_slices = max(1, int(round(SEED_MM / dz)))
    for step, k in enumerate(order[:seed_slices]):
        seed = _seed(gas[k], body[k], px, py, pixel_cm2)
        if seed is None:
            continue
        biggest = int(np.argmax(lung_area[order]))
        if lung_area[order][biggest] == 0 or biggest <= step or \
                lung_area[k] > APEX_FRACTION * lung_area[order][biggest]:
            return out
        column = _follow(gas, order[step:], seed, dz)
        if column is None:
            return out
        return column
    return out


def _seed(gas: np.ndarray, body: np.ndarray, px: np.ndarray, py: np.ndarray,
          pixel_cm2: float) -> np.ndarray | None:
    labels, n = ndimage.label(gas)
    if n == 0:
        return None
    midline = float(px[body].mean())
    front, back = float(py[body].min()), float(py[body].max())  # LPS: anterior is -y
    best = None
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        piece = labels[box] == index
        area = piece.sum() * pixel_cm2
        if not MIN_AREA_CM2 <= area <= MAX_AREA_CM2:
            continue
        x = float(px[box][piece].mean())
        y = float(py[box][piece].mean())
        if abs(x - midline) > MIDLINE_MM or (y - front) > MAX_ANTERIOR_FRACTION * (back - front):
            continue
        if best is None or abs(x - midline) < best[0]:
            whole = np.zeros_like(gas)
            whole[box] = piece
            best = (abs(x - midline), whole)
    return None if best is None else best[1]


def _follow(gas: np.ndarray, order: np.ndarray, seed: np.ndarray,
            dz: float) -> np.ndarray | None:
    out = np.zeros(gas.shape, dtype=bool)
    out[order[0]] = seed
    areas = [int(seed.sum())]
    branches: list[tuple[np.ndarray, int]] = []  # (mask, first area) once past the carina
    bronchus_slices = max(1, int(round(BRONCHUS_MM / dz)))
    previous = seed
    length = 1
    for k in order[1:]:
        if branches:
            break
        touching = _touching(gas[k], previous)
        if len(touching) == 1 and touching[0].sum() <= WIDEN_FACTOR * np.median(areas):
            out[k] = previous = touching[0]
            areas.append(int(previous.sum()))
            length += 1
            continue
        if len(touching) == 2 and all(t.sum() <= WIDEN_FACTOR * np.median(areas)
                                      for t in touching):
            branches = [(t, int(t.sum())) for t in touching]
            out[k] = touching[0] | touching[1]
            carina = list(order).index(k)
            break
        break
    if length * dz < MIN_LENGTH_MM:
        return None
    if branches:
        for mask, first in branches:
            for k in order[carina + 1:carina + 1 + bronchus_slices]:
                touching = _touching(gas[k], mask)
                if len(touching) != 1 or touching[0].sum() > WIDEN_FACTOR * max(first, 1):
                    break
                out[k] |= touching[0]
                mask = touching[0]
    return out


def _touching(gas: np.ndarray, previous: np.ndarray) -> list[np.ndarray]:
    """The gas components of a slice that touch ``previous`` grown by one pixel."""
    grown = cv2.dilate(previous.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    labels, n = ndimage.label(gas)
    hit = np.unique(labels[grown & gas])
    return [labels == i for i in hit if i]


def trace_airways(hu: np.ndarray, column: np.ndarray, factor: int,
                  spacing_mm: tuple[float, float, float], affine: np.ndarray) -> np.ndarray:
    """The trachea and main bronchi at full resolution, grown from the pooled column.

    Parameters
    ----------
    hu
        The source volume.
    column
        :func:`find_airways`' result on the pooled grid (``factor`` source pixels per
        pooled pixel; it may be a few pixels smaller than ``hu`` / ``factor``).
    spacing_mm, affine
        The source grid's.

    Returns
    -------
    numpy.ndarray
        A mask on the source grid (all False when ``column`` is).
    """
    out = np.zeros(hu.shape, dtype=bool)
    ks = np.flatnonzero(column.any(axis=(1, 2)))
    if ks.size == 0:
        return out
    order = np.arange(hu.shape[0]) if affine[2, 0] <= 0 else np.arange(hu.shape[0])[::-1]
    box = _search_box(column, factor, hu.shape, spacing_mm)
    top = int(order[np.isin(order, ks)][0])
    seed = _full(column[top], factor, box) & (hu[top][box] < LUMEN_HU)
    if not seed.any():
        return out
    trachea_px = float(np.median(column[ks].sum(axis=(1, 2)))) * factor * factor
    step_px = max(1, int(round(STEP_MM / min(spacing_mm[1], spacing_mm[2]))))
    bronchus_slices = max(1, int(round(BRONCHUS_MM / abs(spacing_mm[0]))))
    out[top][box] = previous = seed
    carina: int | None = None
    for step, k in enumerate(order[list(order).index(top) + 1:]):
        airway, branches = _grow(hu[k][box] < LUMEN_HU, previous, step_px,
                                 BRANCH_FRACTION * trachea_px, LEAK_FACTOR * trachea_px)
        if not airway.any() or airway.sum() > LEAK_FACTOR * trachea_px:
            break  # the airway ended, or leaked into lung
        if carina is None and branches >= 2:
            carina = step
        if carina is not None and step - carina > bronchus_slices:
            break
        out[k][box] = previous = airway
    return out


def _search_box(column: np.ndarray, factor: int, shape: tuple[int, ...],
                spacing_mm: tuple[float, float, float]) -> tuple[slice, slice]:
    """The source-grid rows and columns around the column, wide enough for the bronchi."""
    rows = np.flatnonzero(column.any(axis=(0, 2)))
    cols = np.flatnonzero(column.any(axis=(0, 1)))
    margin_r = int(round(SEARCH_MM / spacing_mm[1]))
    margin_c = int(round(SEARCH_MM / spacing_mm[2]))
    return (slice(max(0, rows[0] * factor - margin_r), min(shape[1], (rows[-1] + 1) * factor + margin_r)),
            slice(max(0, cols[0] * factor - margin_c), min(shape[2], (cols[-1] + 1) * factor + margin_c)))


#: How far around the pooled column (in-plane) the full-resolution trace may reach:
#: the main bronchi run about 50 mm (right 25, left 50) from the carina at 45 degrees.
SEARCH_MM = 50.0


def _full(pooled: np.ndarray, factor: int, box: tuple[slice, slice]) -> np.ndarray:
    """A pooled slice mask on the source grid, cut to ``box``."""
    full = np.repeat(np.repeat(pooled, factor, axis=0), factor, axis=1)
    rows, cols = box
    padded = np.zeros((max(rows.stop, full.shape[0]), max(cols.stop, full.shape[1])), bool)
    padded[:full.shape[0], :full.shape[1]] = full
    return padded[rows, cols]


def _grow(lumen: np.ndarray, previous: np.ndarray, step_px: int,
          branch_px: float, max_px: float) -> tuple[np.ndarray, int]:
    """The lumen near ``previous`` that touches it, and how many branches of at least
    ``branch_px`` pixels it has.

    Within ``step_px`` of ``previous`` first; then the whole in-plane components it
    belongs to (a bronchus leaving the trachea in-plane) unless they exceed ``max_px``
    (then they run into lung, and only the near part is the airway).
    """
    size = 2 * step_px + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    near = lumen & cv2.dilate(previous.view(np.uint8), kernel).astype(bool)
    labels, n = ndimage.label(near)
    if n == 0:
        return near, 0
    hit = np.unique(labels[previous & near])
    hit = hit[hit > 0]
    airway = np.isin(labels, hit)
    whole, _ = ndimage.label(lumen)
    ids = np.unique(whole[airway])
    extended = np.isin(whole, ids[ids > 0])
    if extended.sum() <= max_px:
        airway = extended
    labels, n = ndimage.label(airway)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return airway, int(np.count_nonzero(sizes >= branch_px))
