"""Generated CT phantoms of four anatomical regions: head, chest, abdomen and pelvis.

Training and test data for the region classifier (:mod:`analysis.region`). Each phantom
is drawn from a seed with realistic variety: body size from infants to large adults,
subcutaneous fat, pixel spacing (0.6-1.0 mm at 512², 1.2-2.0 mm at 256²; 0.4-0.7 mm for
heads, whose field of view is smaller), slice count and spacing, partial and single-slice
coverage, blur and correlated noise, arms beside the trunk or out of the field, contrast
enhancement, a table or head holder, field-of-view truncation and a reconstruction
circle padded with -3024 HU as some scanners write it.

Conventions are those of :mod:`analysis.phantoms.trunk`: ``(slices, rows, columns)``, slice
index increasing towards the feet, rows towards the patient's back (+y in LPS) and
columns towards the patient's left (+x). The chest is drawn by
:func:`analysis.phantoms.trunk.make_phantom` and given ribs, scapulae, sternum, heart, aorta
and liver dome here. Numpy (and OpenCV for the blur) only.

Anatomy is parameterised by ``t``, the position along the region's cranio-caudal
extent: 0 at its cranial end (vertex, lung apices, diaphragm dome, iliac crest), 1 at
its caudal end (skull base, lung bases, iliac crest, upper thighs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from analysis.phantoms.trunk import (
    AIR_HU,
    FAT_HU,
    LABEL_BODY,
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    LUNG_HU,
    SOFT_TISSUE_HU,
    TABLE_HU,
    PhantomSpec,
    make_phantom,
)
from analysis.types import ImageVolume

PHANTOM_REGIONS = ("head", "chest", "abdomen", "pelvis")

#: Labels beyond :mod:`analysis.phantoms.trunk`'s body (1) and lungs (2, 3).
LABEL_BONE = 4
LABEL_BRAIN = 5
LABEL_LIVER = 6
LABEL_SPLEEN = 7
LABEL_KIDNEY = 8
LABEL_BLADDER = 9
LABEL_GAS = 10  # gas in the gut or the paranasal sinuses and mastoids (not lung)

#: Value written outside the reconstruction circle by scanners that pad it.
PADDING_HU = -3024.0

#: Adult cranio-caudal length of each region in mm (a full scan of it).
_REGION_LENGTH_MM = {"head": 180.0, "chest": 300.0, "abdomen": 220.0, "pelvis": 200.0}
_MAX_SLICES = 32


@dataclass(frozen=True)
class RegionSpec:
    """What to draw; :func:`random_region_spec` draws one from a seed.

    Attributes
    ----------
    region
        One of :data:`PHANTOM_REGIONS`.
    seed
        Seeds the anatomy and the noise (the spec itself is drawn from it too).
    slices, matrix
        Volume size ``(slices, matrix, matrix)``.
    pixel_spacing_mm, slice_thickness_mm
        In-plane spacing and distance between slices.
    coverage
        ``(start, stop)`` in ``t`` (0 cranial, 1 caudal): the part of the region scanned.
        Slices sample it evenly; one slice lies at ``start``.
    size
        Body size relative to an average adult: ~0.45 for an infant, 1.3 for a large adult.
    aspect
        Left-right over antero-posterior semi-axis of the trunk (or the head).
    fat_mm
        Subcutaneous fat thickness.
    noise_hu, blur_mm
        Standard deviation of the (spatially correlated) noise and the Gaussian blur
        sigma of the image, the scanner's resolution.
    arms
        ``"down"``: beside the trunk, in the image; ``"up"``: above the head, out of it.
    contrast
        Intravenous contrast: enhanced vessels, heart, kidneys, liver and spleen.
    table
        A patient table (trunk) or head holder (head) under the patient.
    fov_circle
        Pixels outside the inscribed reconstruction circle are set to ``padding_hu``.
    offset_mm
        ``(y, x)`` position of the body centre relative to the image centre.
    """

    region: str
    seed: int
    slices: int
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    coverage: tuple[float, float]
    size: float
    aspect: float
    fat_mm: float
    noise_hu: float
    blur_mm: float
    arms: str
    contrast: bool
    table: bool
    fov_circle: bool
    padding_hu: float
    offset_mm: tuple[float, float]

    # Names analysis.phantoms.dicom_series.ct_series_datasets reads, so region phantoms can be written
    # as DICOM like analysis.phantoms.trunk's.
    @property
    def rows(self) -> int:
        return self.matrix

    @property
    def columns(self) -> int:
        return self.matrix


@dataclass(frozen=True)
class RegionPhantom:
    """A drawn phantom: HU, labels (0 outside, ``LABEL_*`` inside) and its spec."""

    hu: np.ndarray  # float32 (slices, rows, columns)
    labels: np.ndarray  # uint8, same shape
    spec: RegionSpec

    @property
    def region(self) -> str:
        return self.spec.region


# ------------------------------------------------------------------------------- specs


def _region_index(region: str) -> int:
    if region not in PHANTOM_REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(PHANTOM_REGIONS)}")
    return PHANTOM_REGIONS.index(region)


def random_region_spec(region: str, seed: int = 0, **overrides: object) -> RegionSpec:
    """Draw a spec for ``region`` from ``seed``; keyword arguments override fields.

    Overrides are consistent with the rest: ``coverage`` alone re-derives the slices,
    ``slices`` alone the slice spacing (over the coverage), ``matrix`` alone the pixel
    spacing (same field of view, within the region's spacing range). ``max_slices``
    (default 32, not a field) caps the drawn slice count by spacing the slices further
    apart, which keeps training volumes small.
    """
    index = _region_index(region)
    unknown = set(overrides) - set(RegionSpec.__dataclass_fields__) - {"max_slices"}
    if unknown:
        raise TypeError(f"unknown RegionSpec field(s): {', '.join(sorted(unknown))}")
    overrides = dict(overrides)
    max_slices = int(overrides.pop("max_slices", _MAX_SLICES))  # type: ignore[call-overload]
    # The spec has its own stream, always drawn in full, so that overriding a field
    # changes nothing else; the anatomy has another (see draw_region_phantom).
    rng = np.random.default_rng([seed, index, 1])
    head = region == "head"
    drawn: dict[str, object] = {
        "region": region,
        "seed": seed,
        "size": float(rng.choice([rng.uniform(0.45, 0.8), rng.uniform(0.8, 1.3)], p=[0.2, 0.8])),
        "aspect": float(rng.uniform(0.76, 0.88) if head else rng.uniform(1.15, 1.65)),
        "coverage": _draw_coverage(rng),
    }
    layout = (float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0])), int(rng.integers(1, 6)))
    matrix = int(rng.choice([256, 512], p=[0.55, 0.45]))
    truncated = rng.uniform() < (0.05 if head else 0.15)
    # Protocols use a standard field of view unless the patient needs a larger one.
    standard = rng.uniform(200.0, 260.0) if head else rng.uniform(300.0, 480.0)
    fit = rng.uniform(0.8, 1.0) if truncated else rng.uniform(1.05, 1.4)
    drawn.update(
        fat_mm=float(
            rng.uniform(2.0, 6.0) if head else rng.uniform(4.0, 14.0) + 35.0 * rng.uniform() ** 2
        ),
        noise_hu=float(rng.uniform(4.0, 30.0)),
        blur_mm=float(rng.uniform(0.35, 0.9)),
        arms="up" if head else str(rng.choice(["down", "up"], p=[0.45, 0.55])),
        contrast=bool(rng.uniform() < 0.5) and not head,
        table=bool(rng.uniform() < 0.8),
        fov_circle=bool(rng.uniform() < 0.6),
        padding_hu=float(rng.choice([PADDING_HU, AIR_HU, -2000.0])),
        offset_mm=(float(rng.normal(0, 8)), float(rng.normal(0, 10))),
    )
    drawn.update(overrides)
    size, aspect = float(drawn["size"]), float(drawn["aspect"])  # type: ignore[arg-type]
    if "fat_mm" not in overrides and not head:
        drawn["fat_mm"] = float(drawn["fat_mm"]) * min(1.0, 0.4 + 0.6 * size)  # type: ignore[arg-type]
    drawn["matrix"] = matrix = int(drawn.get("matrix", matrix))  # type: ignore[call-overload]
    if "pixel_spacing_mm" not in overrides:
        width = _body_width_mm(region, size, aspect)
        fov = width * fit if truncated else max(width * fit, standard)
        drawn["pixel_spacing_mm"] = _clip_spacing(region, matrix, fov / matrix)
    length = _REGION_LENGTH_MM[region] * (0.6 + 0.4 * min(size, 1.15))  # children are shorter
    start, stop = drawn["coverage"]  # type: ignore[misc]
    drawn["slices"], drawn["slice_thickness_mm"] = _slice_layout(
        (float(stop) - float(start)) * length, layout, max_slices, overrides
    )
    spec = RegionSpec(**drawn)  # type: ignore[arg-type]
    _validate_spec(spec)
    return spec


def _slice_layout(
    covered_mm: float, drawn: tuple[float, int], max_slices: int, overrides: dict[str, object]
) -> tuple[int, float]:
    """(slices, spacing) covering ``covered_mm``, honouring overrides of either.

    ``drawn`` is a drawn slice spacing and a slice count for a thin coverage: one to
    five adjacent slices, as in a test series or a selection.
    """
    thickness, thin_count = drawn
    if "slices" in overrides:
        slices = int(overrides["slices"])  # type: ignore[call-overload]
        if "slice_thickness_mm" in overrides:
            return slices, float(overrides["slice_thickness_mm"])  # type: ignore[arg-type]
        if slices > 1 and covered_mm > 0:
            return slices, covered_mm / (slices - 1)
        return slices, min(thickness, 2.5) if covered_mm == 0 else thickness
    if "slice_thickness_mm" in overrides:
        thickness = float(overrides["slice_thickness_mm"])  # type: ignore[arg-type]
        return max(1, round(covered_mm / thickness) + 1), thickness
    if covered_mm == 0:
        return min(thin_count, max_slices), thickness
    slices = int(np.clip(round(covered_mm / thickness) + 1, 2, max_slices))
    return slices, covered_mm / (slices - 1)


def _body_width_mm(region: str, size: float, aspect: float) -> float:
    if region == "head":
        return 2.0 * _head_semi_axes(size, aspect)[1]
    lr = _trunk_semi_axes(size, aspect)[1]
    return 2.0 * lr * (1.1 if region == "pelvis" else 1.0)


def _head_semi_axes(size: float, aspect: float) -> tuple[float, float]:
    """(AP, LR) of the head: it varies much less with body size than the trunk."""
    ap = 95.0 * (0.78 + 0.2 * min(size, 1.1))
    return ap, ap * aspect


def _trunk_semi_axes(size: float, aspect: float) -> tuple[float, float]:
    ap = 110.0 * size
    return ap, ap * aspect


def _draw_coverage(rng: np.random.Generator) -> tuple[float, float]:
    kind = rng.choice(["full", "partial", "thin"], p=[0.6, 0.28, 0.12])
    if kind == "full":
        return float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.94, 1.0))
    if kind == "partial":
        span = rng.uniform(0.2, 0.7)
        start = rng.uniform(0.0, 1.0 - span)
        return float(start), float(start + span)
    t = float(rng.uniform(0.05, 0.95))
    return t, t  # a few adjacent slices from t on (see _slice_layout)


def _clip_spacing(region: str, matrix: int, spacing: float) -> float:
    if region == "head":
        low, high = (0.4, 0.7) if matrix == 512 else (0.8, 1.4)
    else:
        low, high = (0.6, 1.0) if matrix == 512 else (1.2, 2.0)
    return float(np.clip(spacing, low, high))


def _validate_spec(spec: RegionSpec) -> None:
    if spec.slices < 1 or spec.matrix < 16:
        raise ValueError(
            "slices must be positive and the matrix at least 16, "
            f"got {spec.slices} and {spec.matrix}"
        )
    if spec.pixel_spacing_mm <= 0 or spec.slice_thickness_mm <= 0:
        raise ValueError("pixel_spacing_mm and slice_thickness_mm must be positive")
    if not 0.0 <= spec.coverage[0] <= spec.coverage[1] <= 1.0:
        raise ValueError(f"coverage must satisfy 0 <= start <= stop <= 1, got {spec.coverage}")
    if spec.arms not in ("down", "up"):
        raise ValueError(f"arms must be 'down' or 'up', got {spec.arms!r}")


# ----------------------------------------------------------------------------- drawing


class _Canvas:
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

    def _box(self, cy: float, cx: float, ry: float, rx: float) -> tuple[slice, slice] | None:
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
        box = self._box(cy, cx, reach or ay, reach or ax)
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


def _curve(
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


def _region_length_mm(spec: RegionSpec) -> float:
    return _REGION_LENGTH_MM[spec.region] * (0.6 + 0.4 * min(spec.size, 1.15))


def _slice_positions(spec: RegionSpec) -> np.ndarray:
    """Each slice's ``t``: evenly over the coverage."""
    start, stop = spec.coverage
    if spec.slices == 1:
        return np.array([start])
    if stop - start < 1e-6:
        # A thin coverage: adjacent slices, their spacing apart, around ``start``.
        half = (spec.slices - 1) * spec.slice_thickness_mm / _region_length_mm(spec) / 2
        start, stop = max(0.0, start - half), min(1.0, start + half)
    return np.linspace(start, stop, spec.slices)


# ---------------------------------------------------------------------------- regions


def make_region_phantom(region: str, seed: int = 0, **overrides: object) -> RegionPhantom:
    """Draw a phantom of ``region`` from ``seed``; the same arguments give the same volume.

    Parameters
    ----------
    region
        ``"head"``, ``"chest"``, ``"abdomen"`` or ``"pelvis"``.
    seed
        Draws the spec (size, spacing, coverage, ...), the anatomy and the noise.
    **overrides
        :class:`RegionSpec` fields to fix instead of drawing them (``matrix``,
        ``pixel_spacing_mm``, ``slices``, ``coverage``, ``size``, ``noise_hu``, ``arms``,
        ...), and ``max_slices``. The anatomy does not depend on the spacing or matrix,
        so the same seed at two spacings is the same patient.

    Returns
    -------
    RegionPhantom
    """
    return draw_region_phantom(random_region_spec(region, seed, **overrides))


def draw_region_phantom(spec: RegionSpec) -> RegionPhantom:
    """Draw the phantom a spec describes."""
    _validate_spec(spec)
    index = _region_index(spec.region)
    rng = np.random.default_rng([spec.seed, index, 2])
    if spec.region == "chest":
        hu, labels = _draw_chest(spec, rng)
    else:
        draw_slice = _SLICE_DRAWERS[spec.region]
        hu = np.full((spec.slices, spec.matrix, spec.matrix), AIR_HU, dtype=np.float32)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        anatomy = _ANATOMY[spec.region](spec, rng)
        for k, t in enumerate(_slice_positions(spec)):
            canvas = _Canvas(hu[k], labels[k], spec.pixel_spacing_mm, spec.offset_mm)
            draw_slice(canvas, float(t), spec, anatomy)
            _draw_support(canvas, spec)
    if spec.region != "head":
        _vary_along_z(hu, labels, spec, np.random.default_rng([spec.seed, index, 4]))
    _finish(hu, spec, np.random.default_rng([spec.seed, index, 3]))
    return RegionPhantom(hu=hu, labels=labels, spec=spec)


def phantom_volume(phantom: RegionPhantom) -> ImageVolume:
    """The phantom as an :class:`ImageVolume` of a head-first supine axial series.

    The affine matches what :func:`analysis.volume.volume_from_datasets` returns for
    the phantom written by :mod:`analysis.phantoms.dicom_series`: slices step towards the feet (-z).
    """
    spec = phantom.spec
    s, dz = spec.pixel_spacing_mm, spec.slice_thickness_mm
    affine = np.array(
        [
            [0.0, 0.0, s, -(spec.matrix / 2 - 0.5) * s],
            [0.0, s, 0.0, -(spec.matrix / 2 - 0.5) * s],
            [-dz, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return ImageVolume(hu=phantom.hu, spacing_mm=(dz, s, s), affine=affine)


def _finish(hu: np.ndarray, spec: RegionSpec, rng: np.random.Generator) -> None:
    """Scanner effects: blur (resolution), correlated noise, reconstruction circle."""
    spacing = spec.pixel_spacing_mm
    blur_px = spec.blur_mm / spacing
    # Noise is correlated over about a millimetre whatever the pixel size, as after a
    # reconstruction kernel; its standard deviation is restored after smoothing.
    noise_px = max(0.6, 0.8 / spacing)
    kernel = cv2.getGaussianKernel(2 * math.ceil(3 * noise_px) + 1, noise_px)
    noise_gain = float(np.sum(kernel**2))
    for k in range(hu.shape[0]):
        if blur_px >= 0.3:
            hu[k] = cv2.GaussianBlur(hu[k], (0, 0), blur_px)
        noise = rng.standard_normal(hu.shape[1:], dtype=np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), noise_px)
        hu[k] += noise * np.float32(spec.noise_hu / noise_gain)
    if spec.fov_circle:
        centre = (spec.matrix - 1) / 2.0
        r = np.arange(spec.matrix) - centre
        outside = r[:, None] ** 2 + r[None, :] ** 2 > (spec.matrix / 2.0) ** 2
        hu[:, outside] = spec.padding_hu


def _vary_along_z(
    hu: np.ndarray, labels: np.ndarray, spec: RegionSpec, rng: np.random.Generator
) -> None:
    """Scale each slice about the body centre: a trunk is not a cylinder.

    A trend over the region (up to about 12 %) and a bump in its middle (5 %), drawn
    separately left-right and front-back.
    """
    trend, bump = rng.uniform(-0.12, 0.12, 2), rng.uniform(-0.05, 0.05, 2)
    centre = (
        spec.matrix / 2 - 0.5 + spec.offset_mm[1] / spec.pixel_spacing_mm,
        spec.matrix / 2 - 0.5 + spec.offset_mm[0] / spec.pixel_spacing_mm,
    )
    size = (spec.matrix, spec.matrix)
    for k, t in enumerate(_slice_positions(spec)):
        sy, sx = 1.0 + trend * (t - 0.5) + bump * math.sin(math.pi * t)
        if abs(sy - 1.0) < 1e-3 and abs(sx - 1.0) < 1e-3:
            continue
        m = np.array([[sx, 0.0, (1 - sx) * centre[0]], [0.0, sy, (1 - sy) * centre[1]]])
        hu[k] = cv2.warpAffine(hu[k], m, size, flags=cv2.INTER_LINEAR, borderValue=AIR_HU)
        labels[k] = cv2.warpAffine(labels[k], m, size, flags=cv2.INTER_NEAREST, borderValue=0)


def _draw_support(canvas: _Canvas, spec: RegionSpec) -> None:
    """Table under the trunk, thin curved head holder under the head (not patient)."""
    if not spec.table:
        return
    if spec.region == "head":
        ap, lr = _head_semi_axes(spec.size, spec.aspect)
        canvas.ellipse(8.0, 0.0, ap + 14.0, lr + 14.0, AIR_HU, rim=(3.0, 150.0), within=[0])
        # Keep the holder's lower half only: a cradle, open towards the face.
        box = canvas._box(-ap - 20.0, 0.0, ap + 20.0, lr + 20.0)
        if box is not None:
            clear = canvas.labels[box] == 0
            canvas.hu[box][clear] = AIR_HU
        return
    ap, lr = _trunk_semi_axes(spec.size, spec.aspect)
    width = min(lr * 1.25, 260.0)
    top = ap + 12.0
    box = canvas._box(top + 5.0, 0.0, 5.0, width)
    if box is not None:
        canvas.hu[box] = np.where(canvas.labels[box] == 0, TABLE_HU, canvas.hu[box])


# ------------------------------------------------------------------------------- head


@dataclass(frozen=True)
class _Head:
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


def _head_anatomy(spec: RegionSpec, rng: np.random.Generator) -> _Head:
    ap, lr = _head_semi_axes(spec.size, spec.aspect)
    return _Head(
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


def _draw_head_slice(c: _Canvas, t: float, spec: RegionSpec, h: _Head) -> None:
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


def _draw_skull_base(c: _Canvas, t: float, h: _Head, bap: float, blr: float) -> None:
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


# ------------------------------------------------------------------------------ trunk


@dataclass(frozen=True)
class _Trunk:
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


def _trunk_anatomy(spec: RegionSpec, rng: np.random.Generator) -> _Trunk:
    ap, lr = _trunk_semi_axes(spec.size, spec.aspect)
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
    return _Trunk(
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


def _inner(tr: _Trunk) -> tuple[float, float]:
    """Semi-axes of the cavity inside fat and muscle."""
    return max(tr.ap - tr.fat - tr.muscle, tr.ap * 0.45), max(
        tr.lr - tr.fat - tr.muscle, tr.lr * 0.45
    )


def _draw_wall(c: _Canvas, tr: _Trunk, ap: float, lr: float) -> tuple[float, float]:
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


def _draw_spine(c: _Canvas, tr: _Trunk, y: float, lumbar: bool) -> None:
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


def _draw_arms(c: _Canvas, tr: _Trunk, spec: RegionSpec, ap: float, lr: float, t: float) -> None:
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


def _draw_loops(
    c: _Canvas, tr: _Trunk, t: float, iap: float, ilr: float, region_ok: Callable[[float], bool]
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


def _draw_ribs(
    c: _Canvas,
    tr: _Trunk,
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


# ---------------------------------------------------------------------------- abdomen


def _draw_abdomen_slice(c: _Canvas, t: float, spec: RegionSpec, tr: _Trunk) -> None:
    iap, ilr = _draw_wall(c, tr, tr.ap, tr.lr)
    yv = iap * 0.55
    if t < 0.45:
        _draw_ribs(c, tr, spec.seed * 31 + int(t * 1000), tr.ap, tr.lr, 5, from_deg=55.0)
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
    _draw_loops(c, tr, t, iap, ilr, lambda lt: lt > 0.2)
    if t > 0.45:
        for side in (-1, 1):  # psoas
            s = (t - 0.45) / 0.55
            c.ellipse(yv - 5.0, side * tr.vertebra_r * 1.9, 8.0 + 14.0 * s, 8.0 + 12.0 * s, 50.0)
    c.ellipse(yv - tr.vertebra_r - 12.0, 12.0, 11.0, 11.0, tr.blood_hu)  # aorta
    c.ellipse(yv - tr.vertebra_r - 10.0, -22.0, 9.0, 13.0, tr.blood_hu * 0.8)  # IVC
    _draw_spine(c, tr, yv, lumbar=t > 0.4)
    if t < tr.lung_base_t:
        _draw_lung_bases(c, tr, math.sqrt(1.0 - t / tr.lung_base_t), iap, ilr)
    _draw_arms(c, tr, spec, tr.ap, tr.lr, t)


def _draw_lung_bases(c: _Canvas, tr: _Trunk, g: float, iap: float, ilr: float) -> None:
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


# ----------------------------------------------------------------------------- pelvis


def _draw_pelvis_slice(c: _Canvas, t: float, spec: RegionSpec, tr: _Trunk) -> None:
    s = spec.size
    if t < 0.78:
        iap, ilr = _draw_wall(c, tr, tr.ap, tr.lr)
    else:
        iap, ilr = _draw_thighs(c, tr, t)
    for side in (-1, 1):  # gluteal muscles behind the pelvic bones
        c.ellipse(iap * 0.55, side * ilr * 0.55, iap * 0.45, ilr * 0.38, 52.0, within=[LABEL_BODY])
    _draw_loops(c, tr, t, iap, ilr, lambda lt: lt < 0.45)
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
    _draw_arms(c, tr, spec, tr.ap, tr.lr * (1.0 if t < 0.78 else 0.9), t)


def _draw_thighs(c: _Canvas, tr: _Trunk, t: float) -> tuple[float, float]:
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


def _draw_pelvic_bones(c: _Canvas, t: float, tr: _Trunk, s: float, iap: float, ilr: float) -> None:
    bone = LABEL_BONE
    if t < 0.5:  # sacrum, narrowing downwards; iliac wings sweeping forwards
        w = ilr * (0.35 - 0.25 * t)
        c.ellipse(
            iap * 0.55, 0.0, 14.0 * s + 6.0, w, 280.0, label=bone, rim=(2.5, 650.0), angle_deg=0.0
        )
    if t < 0.42:
        reach = 1.0 - 0.5 * (t / 0.42)
        for side in (-1, 1):
            pts = _curve(
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


_ANATOMY: dict[str, Callable[[RegionSpec, np.random.Generator], object]] = {
    "head": _head_anatomy,
    "abdomen": _trunk_anatomy,
    "pelvis": _trunk_anatomy,
}
_SLICE_DRAWERS: dict[str, Callable[[_Canvas, float, RegionSpec, object], None]] = {
    "head": _draw_head_slice,  # type: ignore[dict-item]
    "abdomen": _draw_abdomen_slice,  # type: ignore[dict-item]
    "pelvis": _draw_pelvis_slice,  # type: ignore[dict-item]
}


# ------------------------------------------------------------------------------ chest


def _draw_chest(spec: RegionSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """analysis.phantoms.trunk's chest at the covered levels, with the anatomy it lacks added."""
    ap, lr = _trunk_semi_axes(spec.size, spec.aspect)
    positions = _slice_positions(spec)
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
    tr = _trunk_anatomy(spec, rng)
    # A thick wall would bury the ribs in the fat of make_phantom's large lungs.
    tr = replace(tr, fat=min(tr.fat, max(0.2 * lr - 8.0, 4.0)))
    for k, t in enumerate(positions):
        c = _Canvas(hu[k], labels[k], spec.pixel_spacing_mm, spec.offset_mm)
        _dress_chest_slice(c, float(t), spec, tr, ap, lr)
    return hu, labels


def _dress_chest_slice(
    c: _Canvas, t: float, spec: RegionSpec, tr: _Trunk, ap: float, lr: float
) -> None:
    soft = [LABEL_BODY]
    _refat_chest_wall(c, tr, ap, lr)
    # make_phantom's lungs reach 0.75 of the AP and 0.78 of the LR semi-axis.
    _draw_ribs(c, tr, spec.seed * 17 + int(t * 1000), ap, lr, 8, least=(0.8, 0.84))
    _draw_arms(c, tr, spec, ap, lr, t)
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
            pts = _curve(
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


def _refat_chest_wall(c: _Canvas, tr: _Trunk, ap: float, lr: float) -> None:
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
