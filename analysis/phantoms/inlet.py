"""The thoracic inlet: the top of a chest CT, from the lower neck to the lung apices.

Real chest protocols start above the lungs: the lower neck with the trachea, the
shoulders (humeral heads, clavicles, scapulae) reaching the sides of the field of
view, and then the apices, often unequal. :func:`analysis.phantoms.chest.draw_chest`
starts at the apices; a chest spec with ``inlet`` redraws its cranial slices
(``t < INLET_T``) here, so the region classifier learns that these are chest too.

Coordinates are those of :class:`analysis.phantoms.canvas.Canvas`: mm from the body
centre, y towards the patient's back, x towards the patient's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.phantoms.canvas import Canvas, curve
from analysis.phantoms.region_specs import LABEL_BONE
from analysis.phantoms.trunk import (
    AIR_HU,
    FAT_HU,
    LABEL_BODY,
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
)

#: Chest slices above this ``t`` are redrawn as the inlet (0 neck ... 1 apices).
INLET_T = 0.18
_MUSCLE_HU = 45.0
_LUNG_HU = -850.0


@dataclass(frozen=True)
class Inlet:
    """One patient's inlet: shoulder width and each apex's size (0..1)."""

    shoulder: float  # lateral reach of the shoulders over the trunk's semi-axis
    apex_left: float
    apex_right: float
    fat: float  # subcutaneous fat, mm


def inlet_anatomy(rng: np.random.Generator) -> Inlet:
    # One apex is often smaller (scarring, a shorter upper lobe): as in the LIDC scan.
    apices = rng.uniform(0.3, 1.0, 2) if rng.uniform() < 0.4 else np.full(2, rng.uniform(0.7, 1.0))
    return Inlet(
        shoulder=float(rng.uniform(1.4, 1.8)),
        apex_left=float(apices[0]),
        apex_right=float(apices[1]),
        fat=float(rng.uniform(15.0, 40.0)),
    )


def draw_inlet_slice(c: Canvas, u: float, ap: float, lr: float, inlet: Inlet) -> None:
    """Replace the slice's body with the inlet at ``u`` (0 lower neck, 1 the apices).

    ``ap``, ``lr`` are the trunk's semi-axes; the table and what lies outside the body
    stay as drawn.
    """
    c.hu[c.labels > 0] = AIR_HU
    c.labels[:] = 0
    width = lr * inlet.shoulder
    depth = ap * (0.7 + 0.25 * u)  # the shoulder girdle deepens towards the apices
    centre = ap * 0.25 * (1.0 - u)  # and moves forwards
    c.ellipse(centre, 0.0, depth, width, FAT_HU, label=LABEL_BODY)
    c.ellipse(centre, 0.0, depth - inlet.fat, width - inlet.fat, _MUSCLE_HU)
    # Fat between the shoulder muscles and around the neck's structures.
    for side in (-1, 1):
        c.ellipse(centre + depth * 0.1, side * width * 0.45, depth * 0.35, width * 0.12, FAT_HU,
                  within=[LABEL_BODY])
    # The neck in front of the shoulders (below it merges into the chest wall).
    neck = ap * (0.5 - 0.2 * u)
    c.ellipse(centre - depth + neck * 0.6, 0.0, neck, lr * 0.35, _MUSCLE_HU, label=LABEL_BODY)
    soft = [LABEL_BODY]
    spine_y = centre + depth * 0.35
    c.ellipse(spine_y, 0.0, 11.0, 13.0, 300.0, label=LABEL_BONE, rim=(2.0, 800.0), within=soft)
    c.stroke([(spine_y, 0.0), (spine_y + depth * 0.45, 0.0)], 3.0, 700.0, label=LABEL_BONE,
             within=soft)  # spinous process
    for side in (-1, 1):
        c.stroke([(spine_y + 4.0, side * 8.0), (spine_y + 14.0, side * 24.0)], 3.0, 700.0,
                 label=LABEL_BONE, within=soft)  # laminae and transverse processes
        # Humeral head at the side, cortex around marrow.
        c.ellipse(centre - depth * 0.1, side * width * 0.68, 18.0, 18.0, 250.0,
                  label=LABEL_BONE, rim=(3.0, 900.0), within=soft)
        # Scapula behind, from the glenoid towards the spine.
        c.stroke(curve((centre + depth * 0.05, side * width * 0.55),
                       (centre + depth * 0.25, side * width * 0.45),
                       (centre + depth * 0.3, side * width * 0.22), 6), 2.5, 600.0,
                 label=LABEL_BONE, within=soft)
        if u > 0.25:  # clavicles in front, from the sternum to the shoulder
            c.stroke(curve((centre - depth * 0.45, side * 14.0),
                           (centre - depth * 0.55, side * width * 0.4),
                           (centre - depth * 0.3, side * width * 0.6), 6), 3.5, 750.0,
                     label=LABEL_BONE, within=soft)
        apex = inlet.apex_left if side > 0 else inlet.apex_right
        grow = max(0.0, (u - 0.35) / 0.65) * apex
        if grow > 0.05:
            label = LABEL_LUNG_LEFT if side > 0 else LABEL_LUNG_RIGHT
            ay, ax = depth * 0.45 * grow, lr * 0.3 * grow
            cy, cx = spine_y - depth * 0.15, side * (18.0 + ax)
            c.ellipse(cy, cx, ay + 4.0, ax + 4.0, 600.0, label=LABEL_BONE, within=soft)  # 1st rib
            c.ellipse(cy, cx, ay, ax, _LUNG_HU, label=label, within=[LABEL_BODY, LABEL_BONE])
    # In front of the spine and of the body's centre, as in the neck (the feature
    # airway_frac looks for it there).
    trachea_y = min(spine_y - 25.0, centre - depth * 0.1)
    c.ellipse(trachea_y, 0.0, 8.0, 9.0, AIR_HU, within=soft, rim=(1.5, 60.0))
