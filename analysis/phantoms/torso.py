"""Trunk anatomy the abdomen, pelvis and chest share.

One patient's trunk (:class:`Trunk`: size, fat and muscle, organ and blood densities, gut
loops) drawn from the anatomy stream, and the parts several regions draw from it: body
wall, spine, arms, gut loops and ribs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from analysis.phantoms.canvas import Canvas
from analysis.phantoms.region_specs import (
    LABEL_BONE,
    LABEL_GAS,
    RegionSpec,
    trunk_semi_axes,
)
from analysis.phantoms.trunk import AIR_HU, FAT_HU, LABEL_BODY, SOFT_TISSUE_HU


@dataclass(frozen=True)
class Trunk:
    ap: float
    lr: float
    fat: float
    muscle: float
    liver_hu: float
    spleen_hu: float
    kidney_hu: float
    blood_hu: float
    vertebra_r: float
    loops: tuple[
        tuple[float, float, float, float, float, float, float], ...
    ]  # t, y, x, r, half-t, gas, kind
    gut_gas: float
    stomach_gas: float
    bladder_fill: float
    arm_gap: float
    lung_base_t: float


def trunk_anatomy(spec: RegionSpec, rng: np.random.Generator) -> Trunk:
    ap, lr = trunk_semi_axes(spec.size, spec.aspect)
    if spec.region == "pelvis":
        ap, lr = ap * 0.95, lr * rng.uniform(1.0, 1.15)
    contrast = 1.0 if spec.contrast else 0.0
    gut_gas = rng.uniform(0.05, 0.6) if spec.region == "abdomen" else rng.uniform(0.0, 0.3)
    count = int(rng.integers(25, 60)) if spec.region == "abdomen" else int(rng.integers(8, 25))
    loops = []
    for _ in range(count):
        r = rng.uniform(7.0, 18.0) * min(1.0, 0.5 + 0.5 * spec.size)
        gas = 1.0 if rng.uniform() < gut_gas else 0.0
        kind = float(rng.choice([0, 1, 2], p=[0.75, 0.15, 0.10]))  # fluid, oral contrast, stool
        loops.append(
            (
                rng.uniform(0.0, 1.0),
                rng.uniform(-0.75, 0.35),
                rng.uniform(-0.8, 0.8),
                r,
                rng.uniform(0.05, 0.2),
                gas,
                kind,
            )
        )
    return Trunk(
        ap=ap,
        lr=lr,
        fat=spec.fat_mm,
        muscle=rng.uniform(5.0, 12.0) * spec.size,
        liver_hu=rng.uniform(50.0, 68.0) + 45.0 * contrast,
        spleen_hu=rng.uniform(40.0, 52.0) + 60.0 * contrast,
        kidney_hu=rng.uniform(28.0, 38.0) + 120.0 * contrast,
        blood_hu=rng.uniform(35.0, 50.0) + rng.uniform(120.0, 260.0) * contrast,
        vertebra_r=rng.uniform(15.0, 21.0) * min(1.0, 0.55 + 0.45 * spec.size),
        loops=tuple(loops),
        gut_gas=gut_gas,
        stomach_gas=rng.uniform(0.0, 0.7),
        bladder_fill=rng.uniform(0.15, 1.0),
        arm_gap=float(rng.choice([0.0, rng.uniform(3.0, 30.0)])),
        # The posterior costophrenic recesses reach down to about L1: lung is seen in
        # the first tenth to third of an abdominal scan.
        lung_base_t=rng.uniform(0.1, 0.33),
    )


def draw_wall(c: Canvas, tr: Trunk, ap: float, lr: float) -> tuple[float, float]:
    """Skin, subcutaneous fat and the muscle wall; returns the inner semi-axes."""
    c.ellipse(0.0, 0.0, ap, lr, SOFT_TISSUE_HU, label=LABEL_BODY)
    fat_ap, fat_lr = ap - 2.0, lr - 2.0
    c.ellipse(0.0, 0.0, fat_ap, fat_lr, FAT_HU)
    wall_ap, wall_lr = max(ap - tr.fat, ap * 0.5), max(lr - tr.fat, lr * 0.5)
    c.ellipse(0.0, 0.0, wall_ap, wall_lr, 50.0)
    inner_ap, inner_lr = max(wall_ap - tr.muscle, ap * 0.45), max(wall_lr - tr.muscle, lr * 0.45)
    # Visceral fat between the organs, more of it with more subcutaneous fat.
    c.ellipse(0.0, 0.0, inner_ap, inner_lr, -60.0 - min(tr.fat, 40.0))
    return inner_ap, inner_lr


def draw_spine(c: Canvas, tr: Trunk, y: float, lumbar: bool) -> None:
    r = tr.vertebra_r
    c.ellipse(y, 0.0, r * 0.9, r, 230.0, label=LABEL_BONE, rim=(2.0, 700.0))
    c.ellipse(y + r * 1.35, 0.0, r * 0.45, r * 0.45, 10.0)  # spinal canal
    c.ellipse(y + r * 1.35, 0.0, r * 0.75, r * 0.85, 550.0, label=LABEL_BONE, within=[LABEL_BODY])
    c.ellipse(y + r * 1.35, 0.0, r * 0.45, r * 0.45, 10.0)
    c.ellipse(y + r * 2.3, 0.0, r * 0.6, r * 0.25, 550.0, label=LABEL_BONE)  # spinous process
    for side in (-1, 1):
        c.ellipse(
            y + r * 2.0, side * r * 1.5, r * 1.1, r * 1.1, 55.0, within=[LABEL_BODY]
        )  # paraspinal
        if lumbar:
            c.ellipse(y + r * 1.1, side * r * 1.5, r * 0.25, r * 0.9, 500.0, label=LABEL_BONE)


def draw_arms(c: Canvas, tr: Trunk, spec: RegionSpec, ap: float, lr: float, t: float) -> None:
    if spec.arms != "down":
        return
    ra = 38.0 * spec.size
    for side in (-1, 1):
        cx = side * (lr + tr.arm_gap + ra * 0.9)
        c.ellipse(ap * 0.1, cx, ra * 1.15, ra * 0.9, SOFT_TISSUE_HU, label=LABEL_BODY)
        c.ellipse(ap * 0.1, cx, ra * 1.15 - 6, ra * 0.9 - 6, FAT_HU * 0.4)
        if spec.region == "pelvis" or t > 0.5:  # forearm: two bones
            c.ellipse(ap * 0.1 - 8, cx, 6.0, 6.0, 900.0, label=LABEL_BONE)
            c.ellipse(ap * 0.1 + 8, cx, 5.0, 5.0, 900.0, label=LABEL_BONE)
        else:
            c.ellipse(
                ap * 0.1,
                cx,
                11.0 * spec.size + 4,
                11.0 * spec.size + 4,
                300.0,
                label=LABEL_BONE,
                rim=(3.0, 1100.0),
            )


def draw_loops(
    c: Canvas, tr: Trunk, t: float, iap: float, ilr: float, region_ok: Callable[[float], bool]
) -> None:
    """Gut loops in the cavity: fluid, oral contrast, stool, some with gas."""
    for lt, y, x, r, half, gas, kind in tr.loops:
        d = (t - lt) / half
        if abs(d) >= 1.0 or not region_ok(lt):
            continue
        rr = r * math.sqrt(1.0 - d * d)
        cy, cx = y * iap, x * ilr
        value = (20.0, 250.0, -60.0)[int(kind)]
        c.ellipse(cy, cx, rr, rr, value, rim=(2.0, 40.0), within=[LABEL_BODY])
        if gas:
            c.ellipse(
                cy - rr * 0.2, cx, rr * 0.75, rr * 0.8, AIR_HU, label=LABEL_GAS, within=[LABEL_BODY]
            )
        elif kind == 2:
            for dy, dx in ((-0.3, -0.2), (0.2, 0.3)):
                c.ellipse(
                    cy + dy * rr,
                    cx + dx * rr,
                    rr * 0.25,
                    rr * 0.25,
                    AIR_HU,
                    label=LABEL_GAS,
                    within=[LABEL_BODY],
                )


def draw_ribs(
    c: Canvas,
    tr: Trunk,
    rng_seed: int,
    ap: float,
    lr: float,
    count: int,
    from_deg: float = 35.0,
    least: tuple[float, float] = (0.6, 0.6),
) -> None:
    """Rib sections under the fat and chest wall muscles, tangential ellipses; cartilage in
    front. ``least`` keeps them outside the lungs, as fractions of the semi-axes."""
    rng = np.random.default_rng(rng_seed)
    depth = tr.fat + tr.muscle * 1.5
    ray, rax = max(ap - depth, ap * least[0]), max(lr - depth, lr * least[1])
    for side in (-1, 1):
        for phi in np.linspace(from_deg, 165.0, count) + rng.uniform(-5, 5, count):
            p = math.radians(phi)
            cy, cx = -ray * math.cos(p), side * rax * math.sin(p)
            angle = -side * (90.0 - phi)
            value = rng.uniform(350.0, 900.0) if phi > 45 else 120.0
            c.ellipse(
                cy, cx, 4.0, 8.0, value, label=LABEL_BONE, angle_deg=angle, within=[LABEL_BODY]
            )
