"""Synthetic CT phantoms in Hounsfield units, with the labels they were drawn from.

Geometrically plausible chest/abdomen volumes (body, table, spine, left and right lungs
with vessels; optionally stomach and bowel gas, diseased lung patches, a trachea with
main bronchi, arms) for tests, benchmarks and model training. Numpy only; writing them
as DICOM is :mod:`node.synthetic`'s job.

Rows run towards the patient's back (+y in LPS) and columns towards the patient's left
(+x), as in a head-first supine axial series; the right lung is at negative x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
BONE_HU = 700.0
TABLE_HU = 200.0

LABEL_BODY = 1
LABEL_LUNG_LEFT = 2
LABEL_LUNG_RIGHT = 3


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw. Sizes are in millimetres, the volume is (slices, rows, columns)."""

    slices: int = 40
    rows: int = 256
    columns: int = 256
    pixel_spacing_mm: float = 1.5
    slice_thickness_mm: float = 2.5
    body_semi_axes_mm: tuple[float, float] = (120.0, 170.0)  # (AP, left-right)
    lungs: bool = True
    stomach_gas: bool = False
    noise_hu: float = 12.0
    seed: int = 0
    # Optional anatomy, all off by default so that existing volumes stay identical.
    bowel_gas: bool = False  # gas pockets (-1000 HU) in the caudal third, as in bowel loops
    consolidation: bool = False  # ~30 HU patch against the right lung's posterolateral pleura
    ground_glass: bool = False  # ~-350 HU patch against the left lung's anterolateral pleura
    trachea: bool = False  # air tube in the cranial slices, joining both lungs via main bronchi
    arms: bool = False  # an arm beside each flank, separated from the trunk by air


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # float32, (slices, rows, columns)
    labels: np.ndarray  # uint8, same shape: 0 outside, LABEL_* inside
    spec: PhantomSpec


def _grid(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Row (y, posterior positive) and column (x) coordinates in mm from the centre."""
    y = (np.arange(spec.rows) - spec.rows / 2 + 0.5) * spec.pixel_spacing_mm
    x = (np.arange(spec.columns) - spec.columns / 2 + 0.5) * spec.pixel_spacing_mm
    return np.meshgrid(y, x, indexing="ij")


def make_phantom(spec: PhantomSpec | None = None) -> Phantom:
    """Draw a phantom; the same spec (and seed) always gives the same volume."""
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(spec.seed)
    yy, xx = _grid(spec)
    hu = np.full((spec.slices, spec.rows, spec.columns), AIR_HU, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    ap, lr = spec.body_semi_axes_mm
    table_y = ap + 15.0

    for k in range(spec.slices):
        # Lungs taper towards the bases (higher k = more caudal).
        z = k / max(spec.slices - 1, 1)
        body = (yy / ap) ** 2 + (xx / lr) ** 2 <= 1.0
        fat = body & ((yy / (ap - 12)) ** 2 + (xx / (lr - 12)) ** 2 > 1.0)
        sl = hu[k]
        sl[body] = SOFT_TISSUE_HU
        sl[fat] = FAT_HU
        labels[k][body] = LABEL_BODY
        spine = ((yy - ap * 0.6) / 18) ** 2 + (xx / 16) ** 2 <= 1.0
        sl[spine] = BONE_HU
        table = (np.abs(yy - table_y) <= 4) & (np.abs(xx) <= lr * 1.1)
        sl[table] = TABLE_HU

        if spec.arms:
            _draw_arms(spec, yy, xx, sl, labels[k])
        scale = max(0.0, 1.0 - 0.8 * z**2)
        if spec.lungs:
            for side, label in ((-1, LABEL_LUNG_RIGHT), (1, LABEL_LUNG_LEFT)):
                cx = side * lr * 0.45
                lung = (
                    ((yy + ap * 0.05) / (ap * 0.7 * scale + 1e-6)) ** 2
                    + ((xx - cx) / (lr * 0.33 * scale + 1e-6)) ** 2
                    <= 1.0
                ) & body
                sl[lung] = LUNG_HU
                labels[k][lung] = label
                # Vessels: small dense circles inside the lung.
                for _ in range(6):
                    vy = rng.uniform(-ap * 0.5, ap * 0.4) * scale
                    vx = cx + rng.uniform(-lr * 0.2, lr * 0.2) * scale
                    vessel = ((yy - vy) ** 2 + (xx - vx) ** 2 <= rng.uniform(9, 25)) & lung
                    sl[vessel] = SOFT_TISSUE_HU
            _draw_lung_disease(spec, z, scale, yy, xx, sl)
        if spec.trachea:
            _draw_airway(spec, z, scale, yy, xx, sl)
        # Gas lies in the abdomen, beside the lung bases on the same slices but
        # separated from them by at least the diaphragm and the gut wall.
        keep_out = _lung_ellipses(spec, scale, yy, xx, margin_mm=8.0) if spec.lungs else None
        if spec.stomach_gas and z > 0.6:
            gas = ((yy + ap * 0.2) / 25) ** 2 + ((xx - lr * 0.3) / 35) ** 2 <= 1.0
            if keep_out is not None:
                gas &= ~keep_out
            sl[gas] = AIR_HU + 50
        if spec.bowel_gas:
            _draw_bowel_gas(spec, k, yy, xx, sl, keep_out)
    hu += rng.normal(0.0, spec.noise_hu, hu.shape).astype(np.float32)
    return Phantom(hu=hu, labels=labels, spec=spec)


def _lung_ellipses(
    spec: PhantomSpec, scale: float, yy: np.ndarray, xx: np.ndarray, margin_mm: float
) -> np.ndarray:
    """Both lungs' ellipses grown by ``margin_mm`` (unclipped to the body)."""
    ap, lr = spec.body_semi_axes_mm
    out = np.zeros(yy.shape, dtype=bool)
    for side in (-1, 1):
        out |= (
            ((yy + ap * 0.05) / (ap * 0.7 * scale + margin_mm + 1e-6)) ** 2
            + ((xx - side * lr * 0.45) / (lr * 0.33 * scale + margin_mm + 1e-6)) ** 2
            <= 1.0
        )
    return out


def _pleural_patch(
    spec: PhantomSpec, scale: float, side: int, angle_deg: float, radius_mm: float,
    yy: np.ndarray, xx: np.ndarray,
) -> np.ndarray:
    """A disc centred on the lung's edge at ``angle_deg`` (0 = lateral), inside the lung."""
    ap, lr = spec.body_semi_axes_mm
    cy, cx = -ap * 0.05, side * lr * 0.45
    sy, sx = ap * 0.7 * scale, lr * 0.33 * scale
    theta = np.radians(angle_deg)
    py, px = cy + sy * np.sin(theta), cx + side * sx * np.cos(theta)
    disc = (yy - py) ** 2 + (xx - px) ** 2 <= (radius_mm * scale) ** 2
    inside = ((yy - cy) / (sy + 1e-6)) ** 2 + ((xx - cx) / (sx + 1e-6)) ** 2 <= 1.0
    return disc & inside


def _draw_lung_disease(
    spec: PhantomSpec, z: float, scale: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray
) -> None:
    """Dense lung still labelled lung: it bites into the air-filled lung's outline."""
    if spec.consolidation and 0.25 <= z <= 0.7:
        sl[_pleural_patch(spec, scale, -1, 45.0, 28.0, yy, xx)] = 30.0
    if spec.ground_glass and 0.15 <= z <= 0.6:
        sl[_pleural_patch(spec, scale, 1, -30.0, 24.0, yy, xx)] = -350.0


def _draw_airway(
    spec: PhantomSpec, z: float, scale: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray
) -> None:
    """Trachea down to z = 0.2, then main bronchi running out into each lung."""
    ap, lr = spec.body_semi_axes_mm
    cy = -ap * 0.25
    if z < 0.2:
        tube = (yy - cy) ** 2 + xx**2 <= 9.0**2
    elif z <= 0.32:
        reach = (z - 0.2) / 0.12 * (lr * 0.45 - lr * 0.33 * scale + 12.0)
        tube = np.zeros(yy.shape, dtype=bool)
        for side in (-1, 1):
            tube |= (yy - cy) ** 2 + (xx - side * reach) ** 2 <= 7.0**2
    else:
        return
    # Labels stay as drawn: body outside the lungs, lung where a bronchus runs inside.
    sl[tube] = AIR_HU


def _draw_arms(
    spec: PhantomSpec, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray, labels: np.ndarray
) -> None:
    ap, lr = spec.body_semi_axes_mm
    for side in (-1, 1):
        cx = side * (lr + 15.0 + 38.0)
        arm = (yy / 45.0) ** 2 + ((xx - cx) / 38.0) ** 2 <= 1.0
        sl[arm] = SOFT_TISSUE_HU
        sl[arm & ((yy / 39.0) ** 2 + ((xx - cx) / 32.0) ** 2 > 1.0)] = FAT_HU
        sl[(yy**2 + (xx - cx) ** 2 <= 11.0**2)] = BONE_HU
        labels[arm] = LABEL_BODY


def _bowel_loops(spec: PhantomSpec) -> list[tuple[float, float, float, float, float, float]]:
    """(slice, y, x, half-height in slices, semi-axis y, semi-axis x) per gas pocket."""
    # Its own generator, so that adding gas leaves the rest of the phantom unchanged.
    rng = np.random.default_rng(spec.seed + 7919)
    ap, lr = spec.body_semi_axes_mm
    first = 0.55 * (spec.slices - 1)
    loops = [(first + 0.6 * (spec.slices - 1 - first), -ap * 0.45, -lr * 0.15, 3.0, 14.0, 70.0)]
    for _ in range(9):
        loops.append((
            rng.uniform(first, spec.slices - 1),
            rng.uniform(-ap * 0.7, -ap * 0.1),
            rng.uniform(-lr * 0.6, lr * 0.6),
            rng.uniform(1.0, 3.0),
            rng.uniform(6.0, 16.0),
            rng.uniform(6.0, 20.0),
        ))
    return loops


def _draw_bowel_gas(
    spec: PhantomSpec, k: int, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray,
    keep_out: np.ndarray | None,
) -> None:
    ap, lr = spec.body_semi_axes_mm
    inside_wall = (yy / (ap - 20)) ** 2 + (xx / (lr - 20)) ** 2 <= 1.0
    for kc, cy, cx, half, sy, sx in _bowel_loops(spec):
        t = (k - kc) / half
        if abs(t) >= 1.0:
            continue
        shrink = np.sqrt(1.0 - t * t)
        gas = ((yy - cy) / (sy * shrink)) ** 2 + ((xx - cx) / (sx * shrink)) ** 2 <= 1.0
        gas &= inside_wall
        if keep_out is not None:
            gas &= ~keep_out
        sl[gas] = AIR_HU
