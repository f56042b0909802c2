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
