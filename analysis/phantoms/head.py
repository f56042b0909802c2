"""The head, vertex to skull base, slice by slice.

Scalp, skull, brain and ventricles, and by level the skull base: orbits, ethmoid,
sphenoid and maxillary sinuses, petrous bones, mastoids, foramen magnum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.phantoms.canvas import Canvas
from analysis.phantoms.region_specs import (
    LABEL_BONE,
    LABEL_BRAIN,
    LABEL_GAS,
    RegionSpec,
    head_semi_axes,
)
from analysis.phantoms.trunk import AIR_HU, LABEL_BODY, SOFT_TISSUE_HU


@dataclass(frozen=True)
class Head:
    ap: float
    lr: float
    scalp: float
    skull: float
    cortical_hu: float
    diploe_hu: float
    brain_hu: float
    white_drop: float
    ventricle_scale: float
    falx_calcified: bool
    sinus_air: float  # 0 = opacified sinuses (fluid), 1 = fully aerated


def head_anatomy(spec: RegionSpec, rng: np.random.Generator) -> Head:
    ap, lr = head_semi_axes(spec.size, spec.aspect)
    return Head(
        ap=ap,
        lr=lr,
        scalp=spec.fat_mm + rng.uniform(1.0, 3.0),
        skull=rng.uniform(4.0, 9.0) * (0.7 + 0.3 * min(spec.size, 1.0)),
        cortical_hu=rng.uniform(1100.0, 1700.0),
        diploe_hu=rng.uniform(350.0, 800.0),
        brain_hu=rng.uniform(31.0, 40.0),
        white_drop=rng.uniform(4.0, 10.0),
        ventricle_scale=rng.uniform(0.6, 1.8),
        falx_calcified=bool(rng.uniform() < 0.3),
        sinus_air=float(rng.choice([1.0, 1.0, 1.0, 0.5, 0.0])),
    )


def _head_profile(t: float) -> float:
    """Cross-section scale along the head: a dome above, the widest around t = 0.55."""
    if t < 0.55:
        return max(0.22, math.sqrt(max(0.0, 1.0 - ((0.55 - t) / 0.58) ** 2)))
    return 1.0 - 0.12 * (t - 0.55) / 0.45


def draw_head_slice(c: Canvas, t: float, spec: RegionSpec, h: Head) -> None:
    f = _head_profile(t)
    ap, lr = h.ap * f, h.lr * f
    # The skull is cut obliquely near the vertex and looks thicker there.
    skull = h.skull * (1.0 + 1.5 * (1.0 - f))
    c.ellipse(0.0, 0.0, ap, lr, SOFT_TISSUE_HU - 10.0, label=LABEL_BODY)
    c.ellipse(0.0, 0.0, ap - 1.5, lr - 1.5, -60.0, within=[LABEL_BODY])  # scalp fat
    inner_ap, inner_lr = ap - h.scalp, lr - h.scalp
    c.ellipse(0.0, 0.0, inner_ap, inner_lr, h.cortical_hu, label=LABEL_BONE)
    c.ellipse(0.0, 0.0, inner_ap - skull * 0.3, inner_lr - skull * 0.3, h.diploe_hu)
    c.ellipse(0.0, 0.0, inner_ap - skull * 0.7, inner_lr - skull * 0.7, h.cortical_hu)
    bap, blr = inner_ap - skull, inner_lr - skull
    if bap <= 2 or blr <= 2:
        return
    c.ellipse(0.0, 0.0, bap, blr, h.brain_hu, label=LABEL_BRAIN)
    if t > 0.12:
        c.ellipse(0.0, 0.0, bap * 0.72, blr * 0.7, h.brain_hu - h.white_drop)
    c.ellipse(0.0, 0.0, bap, 1.2, h.brain_hu + 5.0)  # interhemispheric fissure / falx
    if h.falx_calcified and t < 0.5:
        c.ellipse(-bap * 0.4, 0.0, bap * 0.2, 1.0, 180.0)
    if 0.3 <= t <= 0.62:
        v = h.ventricle_scale * math.sin(math.pi * (t - 0.3) / 0.32)
        for side in (-1, 1):
            c.ellipse(
                -bap * 0.05,
                side * blr * 0.16,
                bap * 0.38 * v,
                blr * 0.07 * v,
                6.0,
                angle_deg=side * 8.0,
            )
    if 0.58 <= t <= 0.7:
        c.ellipse(0.0, 0.0, bap * 0.12, 2.5 * h.ventricle_scale, 6.0)
    if t > 0.62:
        _draw_skull_base(c, t, h, bap, blr)


def _draw_skull_base(c: Canvas, t: float, h: Head, bap: float, blr: float) -> None:
    """Orbits, sinuses, petrous bones, mastoids and foramen magnum, by level."""
    sinus = AIR_HU * h.sinus_air + 15.0 * (1.0 - h.sinus_air)
    bone = h.cortical_hu
    if t <= 0.86:
        # Anterior skull base: orbits (fat and globe) with the ethmoid cells between.
        c.ellipse(-bap * 0.62, 0.0, 3.0, blr * 0.7, bone * 0.8, label=LABEL_BONE)
        for side in (-1, 1):
            c.ellipse(-bap * 0.82, side * blr * 0.42, 19.0, 16.0, -80.0, rim=(2.0, bone * 0.6))
            c.ellipse(-bap * 0.9, side * blr * 0.42, 11.5, 11.5, 12.0)
        if t >= 0.68:
            for i in range(4):
                c.ellipse(
                    -bap * (0.7 + 0.05 * i),
                    0.0,
                    3.5,
                    6.0,
                    sinus,
                    label=LABEL_GAS,
                    rim=(1.0, bone * 0.6),
                )
    if 0.74 <= t <= 0.9:
        c.ellipse(-bap * 0.28, 0.0, 11.0, 12.0, sinus, label=LABEL_GAS, rim=(2.0, bone))  # sphenoid
        for side in (-1, 1):
            c.ellipse(
                bap * 0.15,
                side * blr * 0.5,
                6.0,
                blr * 0.32,
                bone,
                label=LABEL_BONE,
                angle_deg=side * 35.0,
            )
    if 0.78 <= t <= 0.97:
        for side in (-1, 1):
            cy, cx = bap * 0.45, side * blr * 0.8
            c.ellipse(cy, cx, 13.0, 10.0, bone * 0.7, label=LABEL_BONE)
            for dy, dx in ((-5, -3), (0, 3), (5, -2), (-2, 0), (3, 5)):
                c.ellipse(cy + dy, cx + side * dx, 2.0, 2.0, AIR_HU, label=LABEL_GAS)
    if t > 0.86:
        # Maxillary sinuses and nasal cavity in front, foramen magnum behind.
        for side in (-1, 1):
            c.ellipse(
                -bap * 0.72,
                side * blr * 0.33,
                17.0,
                14.0,
                sinus,
                label=LABEL_GAS,
                rim=(2.0, bone * 0.7),
            )
        c.ellipse(-bap * 0.8, 0.0, 18.0, 5.0, AIR_HU, label=LABEL_GAS, rim=(1.5, bone * 0.6))
        c.ellipse(bap * 0.2, 0.0, 19.0, 19.0, bone, label=LABEL_BONE)
        c.ellipse(bap * 0.2, 0.0, 13.0, 13.0, 35.0)
