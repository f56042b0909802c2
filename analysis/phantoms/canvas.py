"""Drawing primitives of the region phantoms: a slice canvas in mm, Bezier curves.

:class:`Canvas` fills ellipses and strokes thick curves into one slice's HU and labels;
every region's anatomy is drawn with it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


class Canvas:
    """One slice being drawn, with each pixel's physical (y, x) in mm from the body centre.

    Shapes are evaluated on their bounding box only, which keeps a 512² slice with
    dozens of organs at a few milliseconds.
    """

    def __init__(
        self, hu: np.ndarray, labels: np.ndarray, spacing: float, offset: tuple[float, float]
    ) -> None:
        self.hu = hu
        self.labels = labels
        rows, columns = hu.shape
        self.y = (np.arange(rows) - rows / 2 + 0.5) * spacing - offset[0]
        self.x = (np.arange(columns) - columns / 2 + 0.5) * spacing - offset[1]

    def bounding_box(
        self, cy: float, cx: float, ry: float, rx: float
    ) -> tuple[slice, slice] | None:
        """Rows and columns within ``ry``, ``rx`` mm of ``(cy, cx)``; None if off the slice."""
        r0, r1 = np.searchsorted(self.y, [cy - ry, cy + ry + 1e-9], side="left")
        c0, c1 = np.searchsorted(self.x, [cx - rx, cx + rx + 1e-9], side="left")
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def ellipse_mask(
        self, cy: float, cx: float, ay: float, ax: float, angle_deg: float = 0.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Box and mask of an ellipse with semi-axes ``ay``, ``ax`` rotated by ``angle_deg``."""
        if ay <= 0 or ax <= 0:
            return None
        reach = max(ay, ax) if angle_deg else None
        box = self.bounding_box(cy, cx, reach or ay, reach or ax)
        if box is None:
            return None
        dy = self.y[box[0], None] - cy
        dx = self.x[None, box[1]] - cx
        if angle_deg:
            c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
            dy, dx = c * dy - s * dx, s * dy + c * dx
        return box, (dy / ay) ** 2 + (dx / ax) ** 2 <= 1.0

    def ellipse(
        self,
        cy: float,
        cx: float,
        ay: float,
        ax: float,
        value: float,
        *,
        label: int | None = None,
        angle_deg: float = 0.0,
        within: Sequence[int] | None = None,
        rim: tuple[float, float] | None = None,
    ) -> None:
        """Fill an ellipse with ``value``.

        ``within`` restricts it to pixels currently carrying one of those labels;
        ``rim=(thickness_mm, value)`` gives it a wall (cortical bone, gut wall).
        """
        drawn = self.ellipse_mask(cy, cx, ay, ax, angle_deg)
        if drawn is None:
            return
        box, mask = drawn
        if within is not None:
            mask &= np.isin(self.labels[box], within)
        hu = self.hu[box]
        if rim is not None:
            thickness, rim_value = rim
            inner = self.ellipse_mask(cy, cx, ay - thickness, ax - thickness, angle_deg)
            hu[mask] = rim_value
            if inner is not None:
                inner_mask = np.zeros_like(mask)
                (r, c), m = inner
                inner_mask[
                    r.start - box[0].start : r.stop - box[0].start,
                    c.start - box[1].start : c.stop - box[1].start,
                ] = m
                hu[mask & inner_mask] = value
        else:
            hu[mask] = value
        if label is not None:
            self.labels[box][mask] = label

    def stroke(
        self,
        points: Sequence[tuple[float, float]],
        radius: float,
        value: float,
        *,
        label: int | None = None,
        within: Sequence[int] | None = None,
    ) -> None:
        """A thick curve: discs along a polyline, about a radius apart."""
        for (y0, x0), (y1, x1) in itertools.pairwise(points):
            steps = max(1, int(math.hypot(y1 - y0, x1 - x0) / max(radius * 0.7, 0.5)))
            for i in range(steps + 1):
                f = i / steps
                self.ellipse(
                    y0 + f * (y1 - y0),
                    x0 + f * (x1 - x0),
                    radius,
                    radius,
                    value,
                    label=label,
                    within=within,
                )


def curve(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 8
) -> list[tuple[float, float]]:
    """Points on a quadratic Bezier curve from p0 to p2 pulled towards p1."""
    out = []
    for i in range(n + 1):
        f = i / n
        out.append(
            (
                (1 - f) ** 2 * p0[0] + 2 * (1 - f) * f * p1[0] + f**2 * p2[0],
                (1 - f) ** 2 * p0[1] + 2 * (1 - f) * f * p1[1] + f**2 * p2[1],
            )
        )
    return out
