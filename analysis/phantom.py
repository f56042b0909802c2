"""Synthetic CT phantoms in Hounsfield units, with the labels they were drawn from.

Geometrically plausible chest/abdomen volumes (body, table, spine, left and right lungs
with vessels, optional stomach gas) for tests, benchmarks and model training. Numpy
only; writing them as DICOM is :mod:`node.synthetic`'s job.
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

        if spec.lungs:
            scale = max(0.0, 1.0 - 0.8 * z**2)
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
        if spec.stomach_gas and z > 0.6:
            gas = ((yy + ap * 0.2) / 25) ** 2 + ((xx - lr * 0.3) / 35) ** 2 <= 1.0
            sl[gas] = AIR_HU + 50
    hu += rng.normal(0.0, spec.noise_hu, hu.shape).astype(np.float32)
    return Phantom(hu=hu, labels=labels, spec=spec)
