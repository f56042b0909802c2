"""The abdomen, diaphragm dome to iliac crest, slice by slice.

Liver, gallbladder, spleen, stomach, kidneys, gut loops, psoas, aorta and IVC, the
spine, and the lung bases at its top.
"""

from __future__ import annotations

import math

from analysis.phantoms.canvas import Canvas
from analysis.phantoms.region_specs import (
    LABEL_GAS,
    LABEL_KIDNEY,
    LABEL_LIVER,
    LABEL_SPLEEN,
    RegionSpec,
)
from analysis.phantoms.torso import (
    Trunk,
    draw_arms,
    draw_loops,
    draw_ribs,
    draw_spine,
    draw_wall,
)
from analysis.phantoms.trunk import (
    AIR_HU,
    LABEL_BODY,
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    LUNG_HU,
    SOFT_TISSUE_HU,
)


def draw_abdomen_slice(c: Canvas, t: float, spec: RegionSpec, tr: Trunk) -> None:
    iap, ilr = draw_wall(c, tr, tr.ap, tr.lr)
    yv = iap * 0.55
    if t < 0.45:
        draw_ribs(c, tr, spec.seed * 31 + int(t * 1000), tr.ap, tr.lr, 5, from_deg=55.0)
    # Organs by level; each shrinks towards the end of its span.
    if t < 0.62:
        g = 1.0 - 0.85 * (t / 0.62) ** 2
        c.ellipse(
            -iap * 0.05,
            -ilr * (0.35 + 0.15 * t),
            iap * 0.85 * g,
            ilr * 0.55 * g,
            tr.liver_hu,
            label=LABEL_LIVER,
        )
        if t < 0.3:  # left lobe across the midline
            c.ellipse(
                -iap * 0.45, ilr * 0.05, iap * 0.35 * g, ilr * 0.3, tr.liver_hu, label=LABEL_LIVER
            )
        if 0.25 <= t <= 0.45 and spec.seed % 3:
            c.ellipse(
                -iap * 0.35, -ilr * 0.25, 14.0 * spec.size, 12.0 * spec.size, 10.0, label=LABEL_BODY
            )  # gallbladder
    if t < 0.42:
        g = math.sin(math.pi * (t + 0.1) / 0.52)
        c.ellipse(
            iap * 0.3,
            ilr * 0.62,
            iap * 0.32 * g,
            ilr * 0.2 * g,
            tr.spleen_hu,
            label=LABEL_SPLEEN,
            angle_deg=-30.0,
        )
        cy, cx, sy, sx = -iap * 0.3, ilr * 0.3, iap * 0.32 * g, ilr * 0.25 * g
        c.ellipse(cy, cx, sy, sx, 15.0, rim=(3.0, 45.0))  # stomach: wall and fluid
        if tr.stomach_gas > 0.05:
            c.ellipse(
                cy - sy * (1.0 - tr.stomach_gas),
                cx,
                sy * tr.stomach_gas,
                sx * 0.85,
                AIR_HU,
                label=LABEL_GAS,
                within=[LABEL_BODY],
            )
            c.ellipse(
                cy - sy * 1.6, cx, sy * 0.6, sx * 1.2, 15.0, within=[LABEL_GAS]
            )  # fluid level
    if 0.3 <= t <= 0.78:
        g = math.sin(math.pi * (t - 0.3) / 0.48)
        for side in (-1, 1):
            c.ellipse(
                yv - 5.0,
                side * ilr * 0.42,
                28.0 * g * spec.size,
                19.0 * g * spec.size,
                tr.kidney_hu,
                label=LABEL_KIDNEY,
                angle_deg=side * 30.0,
            )
            c.ellipse(yv - 5.0, side * ilr * 0.36, 8.0 * g * spec.size, 6.0 * g * spec.size, -40.0)
    draw_loops(c, tr, t, iap, ilr, lambda lt: lt > 0.2)
    if t > 0.45:
        for side in (-1, 1):  # psoas
            s = (t - 0.45) / 0.55
            c.ellipse(yv - 5.0, side * tr.vertebra_r * 1.9, 8.0 + 14.0 * s, 8.0 + 12.0 * s, 50.0)
    c.ellipse(yv - tr.vertebra_r - 12.0, 12.0, 11.0, 11.0, tr.blood_hu)  # aorta
    c.ellipse(yv - tr.vertebra_r - 10.0, -22.0, 9.0, 13.0, tr.blood_hu * 0.8)  # IVC
    draw_spine(c, tr, yv, lumbar=t > 0.4)
    if t < tr.lung_base_t:
        _draw_lung_bases(c, tr, math.sqrt(1.0 - t / tr.lung_base_t), iap, ilr)
    draw_arms(c, tr, spec, tr.ap, tr.lr, t)


def _draw_lung_bases(c: Canvas, tr: Trunk, g: float, iap: float, ilr: float) -> None:
    """Posterior costophrenic recesses: crescents behind the liver and spleen domes."""
    organs = (
        (-1, LABEL_LUNG_RIGHT, tr.liver_hu, LABEL_LIVER),
        (1, LABEL_LUNG_LEFT, tr.spleen_hu, LABEL_SPLEEN),
    )
    for side, label, organ_hu, organ in organs:
        cy, cx = iap * 0.5, side * ilr * 0.55
        ay, ax = iap * 0.45 * g + 4.0, ilr * 0.38 * g + 4.0
        c.ellipse(
            cy,
            cx,
            ay,
            ax,
            LUNG_HU,
            label=label,
            within=[LABEL_BODY, LABEL_LIVER, LABEL_SPLEEN, LABEL_KIDNEY],
        )
        # The dome bites into the lung from in front and inside.
        c.ellipse(
            cy - ay * 0.55,
            cx - side * ax * 0.35,
            ay * 0.8,
            ax * 0.75,
            organ_hu,
            label=organ,
            within=[label],
        )
        for i in range(4):  # vessels
            c.ellipse(
                cy + ay * (0.5 - 0.2 * i),
                cx + side * ax * (0.35 - 0.15 * i),
                2.0,
                2.0,
                SOFT_TISSUE_HU,
                within=[label],
            )
