"""The chest, lung apices to lung bases.

Drawn by :func:`analysis.phantoms.trunk.make_phantom` (body, lungs and vessels, airways,
...) at the covered levels and dressed here with what it lacks: this patient's fat,
ribs, sternum, scapulae, arms, heart, aorta and the diaphragm domes with liver, stomach
and spleen beneath them.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from analysis.phantoms.canvas import Canvas, curve
from analysis.phantoms.inlet import INLET_T, draw_inlet_slice, inlet_anatomy
from analysis.phantoms.region_specs import (
    LABEL_BONE,
    LABEL_LIVER,
    LABEL_SPLEEN,
    RegionSpec,
    slice_positions,
    trunk_semi_axes,
)
from analysis.phantoms.torso import Trunk, draw_arms, draw_ribs, trunk_anatomy
from analysis.phantoms.trunk import (
    FAT_HU,
    LABEL_BODY,
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    SOFT_TISSUE_HU,
    PhantomSpec,
    make_phantom,
)


def draw_chest(spec: RegionSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """analysis.phantoms.trunk's chest at the covered levels, with the anatomy it lacks added."""
    ap, lr = trunk_semi_axes(spec.size, spec.aspect)
    positions = slice_positions(spec)
    # make_phantom spans the whole chest over its slices (t = k / (slices - 1)); a fine
    # enough stack holds every level we need, of which we keep the nearest.
    full = 33
    levels = np.rint(positions * (full - 1)).astype(int)
    # 512² costs four times as much to draw: draw at half resolution, upsample, then
    # blur and add noise at full resolution as for every region.
    half = spec.matrix >= 384
    rows = spec.matrix // 2 if half else spec.matrix
    base = PhantomSpec(
        slices=full,
        rows=rows,
        columns=rows,
        pixel_spacing_mm=spec.pixel_spacing_mm * (spec.matrix / rows),
        slice_thickness_mm=spec.slice_thickness_mm,
        body_semi_axes_mm=(ap, lr),
        lungs=True,
        stomach_gas=bool(rng.uniform() < 0.5),
        noise_hu=0.0,
        seed=int(rng.integers(0, 2**31)),
        bowel_gas=bool(rng.uniform() < 0.3),
        consolidation=bool(rng.uniform() < 0.15),
        ground_glass=bool(rng.uniform() < 0.15),
        trachea=bool(rng.uniform() < 0.75),
        arms=False,  # drawn here, touching the trunk or not, sized to the patient
    )
    drawn = make_phantom(base)
    hu = drawn.hu[levels]
    labels = drawn.labels[levels]
    if half:
        hu = np.stack(
            [cv2.resize(s, (spec.matrix, spec.matrix), interpolation=cv2.INTER_LINEAR) for s in hu]
        )
        labels = np.stack(
            [
                cv2.resize(s, (spec.matrix, spec.matrix), interpolation=cv2.INTER_NEAREST)
                for s in labels
            ]
        )
    # make_phantom centres the body; shift it by the spec's offset (whole pixels).
    shift = (
        round(spec.offset_mm[0] / spec.pixel_spacing_mm),
        round(spec.offset_mm[1] / spec.pixel_spacing_mm),
    )
    hu = np.roll(hu, shift, axis=(1, 2))
    labels = np.roll(labels, shift, axis=(1, 2))
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    labels = np.ascontiguousarray(labels)
    tr = trunk_anatomy(spec, rng)
    # A thick wall would bury the ribs in the fat of make_phantom's large lungs.
    tr = replace(tr, fat=min(tr.fat, max(0.2 * lr - 8.0, 4.0)))
    inlet = inlet_anatomy(np.random.default_rng([spec.seed, 9]))
    for k, t in enumerate(positions):
        c = Canvas(hu[k], labels[k], spec.pixel_spacing_mm, spec.offset_mm)
        if spec.inlet and t < INLET_T:
            draw_inlet_slice(c, float(t) / INLET_T, ap, lr, inlet)
        else:
            _dress_chest_slice(c, float(t), spec, tr, ap, lr)
    return hu, labels


def _dress_chest_slice(
    c: Canvas, t: float, spec: RegionSpec, tr: Trunk, ap: float, lr: float
) -> None:
    soft = [LABEL_BODY]
    _refat_chest_wall(c, tr, ap, lr)
    # make_phantom's lungs reach 0.75 of the AP and 0.78 of the LR semi-axis.
    draw_ribs(c, tr, spec.seed * 17 + int(t * 1000), ap, lr, 8, least=(0.8, 0.84))
    draw_arms(c, tr, spec, ap, lr, t)
    if 0.12 <= t <= 0.85:
        c.ellipse(
            -(max(ap - tr.fat, ap * 0.6) - 6.0),
            0.0,
            6.0,
            12.0,
            400.0,
            label=LABEL_BONE,
            within=soft,
        )  # sternum
    if t < 0.55:
        for side in (-1, 1):  # scapulae behind the ribs
            pts = curve(
                (ap * 0.35, side * lr * 0.8),
                (ap * 0.75, side * lr * 0.7),
                (ap * 0.75, side * lr * 0.3),
                6,
            )
            c.stroke(pts, 3.5, 500.0, label=LABEL_BONE, within=soft)
    if 0.4 <= t <= 0.85:
        c.ellipse(-ap * 0.2, lr * 0.1, ap * 0.38, lr * 0.26, tr.blood_hu, within=soft)  # heart
    c.ellipse(
        ap * 0.3, lr * 0.12, 11.0 * spec.size + 3, 11.0 * spec.size + 3, tr.blood_hu, within=soft
    )  # aorta
    if t > 0.72:
        # The diaphragm domes up under the lung bases: the liver on the right, spleen and
        # stomach on the left push the lungs into posterior crescents.
        g = (t - 0.72) / 0.28
        domed = [LABEL_BODY, LABEL_LUNG_LEFT, LABEL_LUNG_RIGHT]
        c.ellipse(
            -ap * 0.15,
            -lr * 0.35,
            ap * 0.75 * g,
            lr * 0.45 * g,
            tr.liver_hu,
            label=LABEL_LIVER,
            within=domed,
        )
        c.ellipse(
            -ap * 0.2, lr * 0.35, ap * 0.5 * g, lr * 0.3 * g, 30.0, label=LABEL_BODY, within=domed
        )
        c.ellipse(
            ap * 0.25,
            lr * 0.55,
            ap * 0.3 * g,
            lr * 0.15 * g,
            tr.spleen_hu,
            label=LABEL_SPLEEN,
            within=domed,
        )


def _refat_chest_wall(c: Canvas, tr: Trunk, ap: float, lr: float) -> None:
    """Subcutaneous fat of this patient's thickness instead of make_phantom's 12 mm."""
    outer = c.ellipse_mask(0.0, 0.0, ap - 2.0, lr - 2.0)
    if outer is None:
        return
    box, outer_mask = outer
    dy = c.y[box[0], None]
    dx = c.x[None, box[1]]
    inner_ap, inner_lr = max(ap - tr.fat, ap * 0.55), max(lr - tr.fat, lr * 0.55)
    inner_mask = (dy / inner_ap) ** 2 + (dx / inner_lr) ** 2 <= 1.0
    hu, labels = c.hu[box], c.labels[box]
    plain = (labels == LABEL_BODY) & ((np.abs(hu - SOFT_TISSUE_HU) < 1) | (np.abs(hu - FAT_HU) < 1))
    hu[outer_mask & ~inner_mask & plain] = FAT_HU
    # make_phantom's fat ring left inside a thinner layer becomes chest wall muscle.
    hu[inner_mask & plain & (np.abs(hu - FAT_HU) < 1)] = 45.0
