"""The pelvis, iliac crest to upper thighs, slice by slice.

Gluteal muscles, gut loops, bladder, prostate or uterus, rectum, the pelvic bones
(sacrum, iliac wings, hips, pubic rami, ischia, femora) and iliac vessels; below the
hips the outline splits into the thighs.
"""

from __future__ import annotations

import math

from analysis.phantoms.canvas import Canvas, curve
from analysis.phantoms.region_specs import (
    LABEL_BLADDER,
    LABEL_BONE,
    LABEL_GAS,
    RegionSpec,
)
from analysis.phantoms.torso import Trunk, draw_arms, draw_loops, draw_wall
from analysis.phantoms.trunk import AIR_HU, FAT_HU, LABEL_BODY, SOFT_TISSUE_HU


def draw_pelvis_slice(c: Canvas, t: float, spec: RegionSpec, tr: Trunk) -> None:
    s = spec.size
    if t < 0.78:
        iap, ilr = draw_wall(c, tr, tr.ap, tr.lr)
    else:
        iap, ilr = _draw_thighs(c, tr, t)
    for side in (-1, 1):  # gluteal muscles behind the pelvic bones
        c.ellipse(iap * 0.55, side * ilr * 0.55, iap * 0.45, ilr * 0.38, 52.0, within=[LABEL_BODY])
    draw_loops(c, tr, t, iap, ilr, lambda lt: lt < 0.45)
    if 0.42 <= t <= 0.88:  # bladder, prostate or uterus, rectum
        g = math.sin(math.pi * (t - 0.42) / 0.46) * tr.bladder_fill
        c.ellipse(
            -iap * 0.3,
            0.0,
            iap * 0.4 * g + 6.0,
            ilr * 0.32 * g + 6.0,
            8.0,
            label=LABEL_BLADDER,
            rim=(2.5, 35.0),
        )
        c.ellipse(iap * 0.12, 0.0, 16.0 * s, 20.0 * s, 40.0)
    if t >= 0.4:
        c.ellipse(iap * 0.45, 0.0, 15.0 * s, 17.0 * s, 35.0, rim=(3.0, 40.0))
        if spec.seed % 4 == 0:
            c.ellipse(iap * 0.45, 0.0, 6.0 * s, 8.0 * s, AIR_HU, label=LABEL_GAS)
    _draw_pelvic_bones(c, t, tr, s, iap, ilr)
    for side in (-1, 1):  # iliac / femoral vessels
        c.ellipse(
            -iap * (0.15 + 0.3 * t),
            side * ilr * (0.35 + 0.1 * t),
            6.0 * s + 2,
            6.0 * s + 2,
            tr.blood_hu,
        )
    draw_arms(c, tr, spec, tr.ap, tr.lr * (1.0 if t < 0.78 else 0.9), t)


def _draw_thighs(c: Canvas, tr: Trunk, t: float) -> tuple[float, float]:
    """Below the hips the outline splits into two thighs joined by the perineum."""
    u = (t - 0.78) / 0.22
    for side in (-1, 1):
        c.ellipse(
            0.0, side * tr.lr * 0.5, tr.ap * 0.85, tr.lr * 0.52, SOFT_TISSUE_HU, label=LABEL_BODY
        )
    c.ellipse(0.0, 0.0, tr.ap * (0.8 - 0.5 * u), tr.lr * 0.3, SOFT_TISSUE_HU, label=LABEL_BODY)
    for side in (-1, 1):
        c.ellipse(
            0.0, side * tr.lr * 0.5, tr.ap * 0.85 - 2, tr.lr * 0.52 - 2, FAT_HU, within=[LABEL_BODY]
        )
    for side in (-1, 1):
        c.ellipse(
            0.0,
            side * tr.lr * 0.5,
            max(tr.ap * 0.85 - tr.fat, 20.0),
            max(tr.lr * 0.52 - tr.fat, 20.0),
            50.0,
        )
    return tr.ap * 0.8, tr.lr * 0.9


def _draw_pelvic_bones(c: Canvas, t: float, tr: Trunk, s: float, iap: float, ilr: float) -> None:
    bone = LABEL_BONE
    if t < 0.5:  # sacrum, narrowing downwards; iliac wings sweeping forwards
        w = ilr * (0.35 - 0.25 * t)
        c.ellipse(
            iap * 0.55, 0.0, 14.0 * s + 6.0, w, 280.0, label=bone, rim=(2.5, 650.0), angle_deg=0.0
        )
    if t < 0.42:
        reach = 1.0 - 0.5 * (t / 0.42)
        for side in (-1, 1):
            pts = curve(
                (iap * 0.5, side * w * 0.9),
                (iap * 0.35, side * ilr * 0.85),
                (iap * (0.45 - 0.8 * reach), side * ilr * (0.75 + 0.1 * reach)),
            )
            c.stroke(pts, (4.0 + 4.0 * (1.0 - t)) * max(s, 0.6), 520.0, label=bone)
    if 0.38 <= t <= 0.75:  # acetabula and femoral heads
        z = (t - 0.56) / 0.18
        r = 24.0 * max(s, 0.5) * math.sqrt(max(0.0, 1.0 - min(abs(z), 1.0) ** 2)) + 3.0
        for side in (-1, 1):
            cy, cx = -iap * 0.05, side * ilr * 0.62
            c.ellipse(
                cy, cx - side * 4.0, r + 9.0, r + 9.0, 600.0, label=bone
            )  # acetabular roof / wall
            c.ellipse(cy, cx, r + 1.5, r + 1.5, 40.0)  # joint space
            c.ellipse(cy, cx, r, r, 300.0, label=bone, rim=(2.0, 900.0))
    if 0.6 <= t <= 0.86:  # pubic rami and symphysis in front, ischia behind, trochanters
        for side in (-1, 1):
            c.stroke(
                [(-iap * 0.1, side * ilr * 0.55), (-iap * 0.6, side * 6.0)],
                6.0 * max(s, 0.6),
                520.0,
                label=bone,
            )
            c.ellipse(
                iap * 0.4,
                side * ilr * 0.42,
                18.0 * s + 4,
                12.0 * s + 4,
                420.0,
                label=bone,
                rim=(2.0, 800.0),
            )
            c.ellipse(
                0.0,
                side * ilr * 0.85,
                20.0 * s + 5,
                16.0 * s + 5,
                300.0,
                label=bone,
                rim=(2.5, 850.0),
            )
    if t > 0.8:  # femoral shafts
        for side in (-1, 1):
            c.ellipse(
                0.0,
                side * tr.lr * 0.55,
                14.0 * s + 3,
                14.0 * s + 3,
                -20.0,
                label=bone,
                rim=(5.0 * s + 1, 1200.0),
            )
