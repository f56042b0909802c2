"""Synthetic CT phantoms in Hounsfield units, with the labels they were drawn from.

Geometrically plausible chest/abdomen volumes (body, table, spine, left and right lungs
with vessels; optionally stomach and bowel gas, diseased lung patches, a trachea with
main bronchi, arms, ribs, a heart and aorta, diaphragm domes with liver and stomach
beneath them, and variety in body shape, position and lung size) for tests,
benchmarks and model training. Numpy and SciPy only; writing them as DICOM is
:mod:`analysis.phantoms.dicom_series`'s job.

Rows run towards the patient's back (+y in LPS) and columns towards the patient's left
(+x), as in a head-first supine axial series; the right lung is at negative x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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
    # Variety for model training; the defaults draw the volumes above unchanged.
    body_exponent: float = 2.0  # outline |y/a|^p + |x/b|^p <= 1: 2 an ellipse, 3 boxier
    body_offset_mm: tuple[float, float] = (0.0, 0.0)  # (y, x) of the body centre
    fat_mm: float = 12.0  # subcutaneous fat thickness
    table: bool = True
    pad_mm: float = 0.0  # foam mattress (background) this thick between back and table
    pad_hu: float = -900.0
    arm_gap_mm: float = 15.0  # air between arm and flank
    lung_semi_axes: tuple[float, float] = (0.7, 0.33)  # (AP, LR) fractions of the body's
    lung_centre_x: float = 0.45  # each lung's centre, fraction of the body's LR semi-axis
    lung_taper: float = 0.8  # lung size falls as 1 - taper * z^2 towards the bases
    lung_extent: float = 1.0  # fraction of the slices (cranial first) holding lung
    lung_hu: float = LUNG_HU
    lung_gradient_hu: float = 0.0  # posterior (dependent) lung this much denser than anterior
    vessels_per_slice: int = 6  # per lung
    ribs: bool = False  # ribs around the chest wall and a sternum, where there is lung
    heart: bool = False  # heart (anterior, left of midline) and descending aorta
    heart_hu: float = SOFT_TISSUE_HU  # 150-300 with intravenous contrast
    # Diaphragm domes: liver under the right, stomach under the left, rising into the
    # lung bases from ``dome_top`` (fraction of the lung extent), so that the bases are
    # crescents around them on the same slices; stomach gas then lies anteriorly in the
    # stomach, under the left dome. Use with a gentler ``lung_taper`` (about 0.3).
    diaphragm: bool = False
    dome_top: tuple[float, float] = (0.6, 0.68)  # (right, left)
    # A dome's full section relative to its lung: centre (fraction of the body's AP
    # semi-axis, negative = anterior) and size. Centred and smaller, the base of the
    # lung is a ring round the dome; anterior and larger, only its posterior recess.
    dome_centre_y: float = -0.2
    dome_size: float = 1.15
    blur_mm: float = 0.0  # Gaussian sigma before the noise: scanner resolution
    # Where the diseased patches lie: (side: -1 right, +1 left lung; angle in degrees
    # round the lung's edge, 0 lateral, 90 posterior; radius in mm), and their density.
    consolidation_site: tuple[int, float, float] = (-1, 45.0, 28.0)
    consolidation_hu: float = 30.0
    ground_glass_site: tuple[int, float, float] = (1, -30.0, 24.0)


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # float32, (slices, rows, columns)
    labels: np.ndarray  # uint8, same shape: 0 outside, LABEL_* inside
    spec: PhantomSpec


def _grid(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Row (y, posterior positive) and column (x) coordinates in mm from the body centre."""
    y = (np.arange(spec.rows) - spec.rows / 2 + 0.5) * spec.pixel_spacing_mm
    x = (np.arange(spec.columns) - spec.columns / 2 + 0.5) * spec.pixel_spacing_mm
    y -= spec.body_offset_mm[0]
    x -= spec.body_offset_mm[1]
    return np.meshgrid(y, x, indexing="ij")


def phantom_affine(spec: PhantomSpec, *, flip_columns: bool = False) -> np.ndarray:
    """Index -> patient LPS affine of a head-first supine axial series of the phantom.

    Columns run towards the patient's left (+x), rows to the back (+y), slices towards
    the feet (-z). ``flip_columns`` describes the same patient stored mirrored (columns
    towards the patient's right), for drawing ``hu[:, :, ::-1]``.
    """
    ps, st = spec.pixel_spacing_mm, spec.slice_thickness_mm
    affine = np.array([[0, 0, ps, 0], [0, ps, 0, 0], [-st, 0, 0, 0], [0, 0, 0, 1.0]])
    affine[0, 3] = -(spec.columns / 2 - 0.5) * ps
    affine[1, 3] = -(spec.rows / 2 - 0.5) * ps
    if flip_columns:
        affine[0, 2] = -ps
        affine[0, 3] = (spec.columns / 2 - 0.5) * ps
    return affine


def _inside(yy: np.ndarray, xx: np.ndarray, ay: float, ax: float, exponent: float) -> np.ndarray:
    """Inside the superellipse with semi-axes (ay, ax) centred on the grid's origin."""
    if exponent == 2.0:  # the plain ellipse, computed as it always was
        return (yy / ay) ** 2 + (xx / ax) ** 2 <= 1.0
    return np.abs(yy / ay) ** exponent + np.abs(xx / ax) ** exponent <= 1.0


def make_phantom(spec: PhantomSpec | None = None) -> Phantom:
    """Draw a phantom; the same spec (and seed) always gives the same volume."""
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(spec.seed)
    yy, xx = _grid(spec)
    hu = np.full((spec.slices, spec.rows, spec.columns), AIR_HU, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    ap, lr = spec.body_semi_axes_mm
    table_y = ap + 15.0 if spec.pad_mm <= 0 else ap + spec.pad_mm + 4.0

    for k in range(spec.slices):
        # Lungs taper towards the bases (higher k = more caudal).
        z = k / max(spec.slices - 1, 1)
        zl = z / spec.lung_extent  # position along the lungs; beyond 1 the abdomen
        body = _inside(yy, xx, ap, lr, spec.body_exponent)
        fat = body & ~_inside(yy, xx, ap - spec.fat_mm, lr - spec.fat_mm, spec.body_exponent)
        sl = hu[k]
        sl[body] = SOFT_TISSUE_HU
        sl[fat] = FAT_HU
        labels[k][body] = LABEL_BODY
        spine = ((yy - ap * 0.6) / 18) ** 2 + (xx / 16) ** 2 <= 1.0
        sl[spine] = BONE_HU
        if spec.table:
            table = (np.abs(yy - table_y) <= 4) & (np.abs(xx) <= lr * 1.1)
            sl[table] = TABLE_HU
        if spec.pad_mm > 0:
            pad = (yy > 0) & (yy < table_y - 4) & (np.abs(xx) <= lr * 1.05) & ~body
            sl[pad] = spec.pad_hu

        if spec.arms:
            _draw_arms(spec, yy, xx, sl, labels[k])
        scale = max(0.0, 1.0 - spec.lung_taper * zl**2)
        walls = _draw_walls(spec, zl, scale, yy, xx, sl)
        has_lungs = spec.lungs and zl <= 1.0
        drawn = np.zeros(yy.shape, dtype=bool)
        if has_lungs:
            for side, label in ((-1, LABEL_LUNG_RIGHT), (1, LABEL_LUNG_LEFT)):
                cx = side * lr * spec.lung_centre_x
                lung = _lung_ellipse(spec, scale, side, yy, xx, margin_mm=0.0) & body
                if walls is not None:
                    lung &= ~walls
                if spec.diaphragm:
                    lung &= ~_dome_section(spec, zl, side, yy, xx)
                if spec.lung_gradient_hu:
                    # Gravity: the dependent (posterior) lung holds more blood and water.
                    sl[lung] = spec.lung_hu + spec.lung_gradient_hu * 0.5 * (yy[lung] / ap)
                else:
                    sl[lung] = spec.lung_hu
                labels[k][lung] = label
                drawn |= lung
                # Vessels: small dense circles inside the lung.
                for _ in range(spec.vessels_per_slice):
                    vy = rng.uniform(-ap * 0.5, ap * 0.4) * scale
                    vx = cx + rng.uniform(-lr * 0.2, lr * 0.2) * scale
                    vessel = ((yy - vy) ** 2 + (xx - vx) ** 2 <= rng.uniform(9, 25)) & lung
                    sl[vessel] = SOFT_TISSUE_HU
            _draw_lung_disease(spec, zl, scale, yy, xx, sl, drawn)
        if spec.trachea:
            _draw_airway(spec, zl, scale, yy, xx, sl)
        if spec.diaphragm:
            _draw_abdomen_under_domes(spec, zl, yy, xx, sl, body, drawn)
        # Gas lies in the abdomen, beside the lung bases on the same slices but
        # separated from them by at least the diaphragm and the gut wall.
        keep_out = None
        if has_lungs:
            keep_out = (
                _grown(drawn, 8.0, spec.pixel_spacing_mm) if spec.diaphragm
                else _lung_ellipses(spec, scale, yy, xx, margin_mm=8.0)
            )
        if spec.stomach_gas and not spec.diaphragm and 0.6 < zl <= 1.6:
            gas = ((yy + ap * 0.2) / 25) ** 2 + ((xx - lr * 0.3) / 35) ** 2 <= 1.0
            if keep_out is not None:
                gas &= ~keep_out
            sl[gas] = AIR_HU + 50
        if spec.bowel_gas:
            _draw_bowel_gas(spec, k, yy, xx, sl, keep_out)
    if spec.blur_mm > 0:
        sigma = spec.blur_mm / spec.pixel_spacing_mm
        hu[:] = ndimage.gaussian_filter(hu, (0.0, sigma, sigma))
    hu += rng.normal(0.0, spec.noise_hu, hu.shape).astype(np.float32)
    return Phantom(hu=hu, labels=labels, spec=spec)


def _lung_ellipse(
    spec: PhantomSpec, scale: float, side: int, yy: np.ndarray, xx: np.ndarray, margin_mm: float
) -> np.ndarray:
    """One lung's ellipse (side -1 right, +1 left) grown by ``margin_mm``, unclipped."""
    ap, lr = spec.body_semi_axes_mm
    fy, fx = spec.lung_semi_axes
    return (
        ((yy + ap * 0.05) / (ap * fy * scale + margin_mm + 1e-6)) ** 2
        + ((xx - side * lr * spec.lung_centre_x) / (lr * fx * scale + margin_mm + 1e-6)) ** 2
        <= 1.0
    )


def _lung_ellipses(
    spec: PhantomSpec, scale: float, yy: np.ndarray, xx: np.ndarray, margin_mm: float
) -> np.ndarray:
    """Both lungs' ellipses grown by ``margin_mm`` (unclipped to the body)."""
    out = np.zeros(yy.shape, dtype=bool)
    for side in (-1, 1):
        out |= _lung_ellipse(spec, scale, side, yy, xx, margin_mm)
    return out


def _grown(mask: np.ndarray, margin_mm: float, spacing_mm: float) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (Euclidean)."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= margin_mm


def _draw_walls(
    spec: PhantomSpec, zl: float, scale: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray
) -> np.ndarray | None:
    """Ribs, sternum, heart and aorta; returns where lung must not be (them and a rim)."""
    if not (spec.ribs or spec.heart):
        return None
    ap, lr = spec.body_semi_axes_mm
    blocked = np.zeros(yy.shape, dtype=bool)
    if spec.ribs and zl <= 1.1:
        bone = _ribs(spec, zl, yy, xx)
        sl[bone] = BONE_HU
        blocked |= bone
    if spec.heart:
        if 0.3 <= zl <= 0.85:
            h = np.sqrt(max(0.0, 1.0 - ((zl - 0.575) / 0.3) ** 2))
            heart = (
                ((yy + ap * 0.3) / (ap * 0.4 * h + 1e-6)) ** 2
                + ((xx - lr * 0.12) / (lr * 0.3 * h + 1e-6)) ** 2
                <= 1.0
            )
            sl[heart] = spec.heart_hu
            blocked |= heart
        aorta = ((yy - ap * 0.35) ** 2 + (xx - lr * 0.12) ** 2 <= 12.0**2) if zl <= 1.3 else None
        if aorta is not None:
            sl[aorta] = spec.heart_hu
            blocked |= aorta
    # Pleura, pericardium and intercostal muscle: lung never touches them directly.
    return _grown(blocked, 3.0, spec.pixel_spacing_mm)


def _ribs(spec: PhantomSpec, zl: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Rib sections on a ring inside the chest wall, and the sternum in front."""
    ap, lr = spec.body_semi_axes_mm
    ry, rx = ap - spec.fat_mm - 7.0, lr - spec.fat_mm - 7.0
    bone = np.zeros(yy.shape, dtype=bool)
    # Ribs run obliquely, so their sections move round the ring from slice to slice.
    for angle in np.radians(np.concatenate([np.linspace(-70, 65, 7), np.linspace(115, 250, 7)])):
        a = angle + 0.25 * np.sin(6.0 * zl + angle)
        cy, cx = ry * np.sin(a), rx * np.cos(a)
        bone |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 5.5**2
    if zl <= 0.9:
        bone |= ((yy + ry) / 6.0) ** 2 + (xx / 14.0) ** 2 <= 1.0
    return bone


def _dome_centre(spec: PhantomSpec, side: int) -> tuple[float, float, float, float]:
    """(y, x, semi-axis y, semi-axis x) of a diaphragm dome's full section."""
    ap, lr = spec.body_semi_axes_mm
    fy, fx = spec.lung_semi_axes
    # Anterior of the lung's centre: the posterior recesses reach lowest.
    size = spec.dome_size
    return ap * spec.dome_centre_y, side * lr * spec.lung_centre_x, ap * fy * size, lr * fx * size * 1.087


def _dome_depth(spec: PhantomSpec, zl: float, side: int) -> float:
    """0 above the dome's top, rising to 1 at the lung bases (zl = 1)."""
    top = spec.dome_top[0] if side < 0 else spec.dome_top[1]
    return float(np.clip((zl - top) / max(1.0 - top, 1e-6), 0.0, 1.0))


def _dome_section(spec: PhantomSpec, zl: float, side: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    depth = _dome_depth(spec, zl, side)
    if depth <= 0.0:
        return np.zeros(yy.shape, dtype=bool)
    cy, cx, sy, sx = _dome_centre(spec, side)
    r = np.sqrt(depth)
    return ((yy - cy) / (sy * r)) ** 2 + ((xx - cx) / (sx * r)) ** 2 <= 1.0


def _draw_abdomen_under_domes(
    spec: PhantomSpec, zl: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray,
    body: np.ndarray, lungs: np.ndarray,
) -> None:
    """Liver under the right dome, stomach (gas anteriorly, supine) under the left."""
    ap, lr = spec.body_semi_axes_mm
    interior = _inside(yy, xx, ap - spec.fat_mm - 4.0, lr - spec.fat_mm - 4.0, spec.body_exponent)
    clear = interior & body & ~_grown(lungs, 4.0, spec.pixel_spacing_mm)
    liver = _dome_section(spec, zl, -1, yy, xx) & clear
    sl[liver] = 60.0
    # The stomach fills the top of the left dome and narrows below the lung bases.
    size = 0.8 * np.sqrt(_dome_depth(spec, zl, 1)) * float(np.clip(1.0 - (zl - 1.0) / 0.6, 0.0, 1.0))
    if size <= 0.0:
        return
    cy, cx, sy, sx = _dome_centre(spec, 1)
    stomach = ((yy - cy) / (sy * size)) ** 2 + ((xx - cx) / (sx * size)) ** 2 <= 1.0
    stomach &= clear
    sl[stomach] = 35.0
    if spec.stomach_gas and stomach.any():
        rows = np.flatnonzero(stomach.any(axis=1))
        # An air-fluid level: gas fills the anterior (upper) part of the stomach.
        level = rows[0] + max(1, int(0.35 * (rows[-1] - rows[0] + 1)))
        gas = stomach & (np.arange(yy.shape[0])[:, None] < level)
        gas &= ~_grown(lungs, 8.0, spec.pixel_spacing_mm)
        sl[gas] = AIR_HU + 50


def _pleural_patch(
    spec: PhantomSpec, scale: float, side: int, angle_deg: float, radius_mm: float,
    yy: np.ndarray, xx: np.ndarray,
) -> np.ndarray:
    """A disc centred on the lung's edge at ``angle_deg`` (0 = lateral), inside the lung."""
    ap, lr = spec.body_semi_axes_mm
    cy, cx = -ap * 0.05, side * lr * spec.lung_centre_x
    sy, sx = ap * spec.lung_semi_axes[0] * scale, lr * spec.lung_semi_axes[1] * scale
    theta = np.radians(angle_deg)
    py, px = cy + sy * np.sin(theta), cx + side * sx * np.cos(theta)
    disc = (yy - py) ** 2 + (xx - px) ** 2 <= (radius_mm * scale) ** 2
    inside = ((yy - cy) / (sy + 1e-6)) ** 2 + ((xx - cx) / (sx + 1e-6)) ** 2 <= 1.0
    return disc & inside


def _draw_lung_disease(
    spec: PhantomSpec, z: float, scale: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray,
    lungs: np.ndarray,
) -> None:
    """Dense lung still labelled lung: it bites into the air-filled lung's outline."""
    if spec.consolidation and 0.25 <= z <= 0.7:
        side, angle, radius = spec.consolidation_site
        sl[_pleural_patch(spec, scale, side, angle, radius, yy, xx) & lungs] = spec.consolidation_hu
    if spec.ground_glass and 0.15 <= z <= 0.6:
        side, angle, radius = spec.ground_glass_site
        sl[_pleural_patch(spec, scale, side, angle, radius, yy, xx) & lungs] = -350.0


def _draw_airway(
    spec: PhantomSpec, z: float, scale: float, yy: np.ndarray, xx: np.ndarray, sl: np.ndarray
) -> None:
    """Trachea down to z = 0.2, then main bronchi running out into each lung."""
    ap, lr = spec.body_semi_axes_mm
    cy = -ap * 0.25
    if z < 0.2:
        tube = (yy - cy) ** 2 + xx**2 <= 9.0**2
    elif z <= 0.32:
        reach = (z - 0.2) / 0.12 * (lr * spec.lung_centre_x - lr * spec.lung_semi_axes[1] * scale + 12.0)
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
        cx = side * (lr + spec.arm_gap_mm + 38.0)
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
