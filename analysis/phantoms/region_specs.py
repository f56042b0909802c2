"""What a region phantom is: regions, labels, a spec drawn from a seed, the result.

:func:`random_region_spec` draws the patient and the protocol with realistic variety:
body size from infants to large adults, subcutaneous fat, pixel spacing (0.6-1.0 mm at
512², 1.2-2.0 mm at 256²; 0.4-0.7 mm for heads, whose field of view is smaller), slice
count and spacing, partial and single-slice coverage, blur and correlated noise, arms
beside the trunk or out of the field, contrast enhancement, a table or head holder,
field-of-view truncation and a reconstruction circle padded with -3024 HU as some
scanners write it. :func:`slice_positions` places the slices along the region.

Nothing here draws pixels: every other part of :mod:`analysis.phantoms.regions` imports
this module, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.phantoms.trunk import AIR_HU

PHANTOM_REGIONS = ("head", "chest", "abdomen", "pelvis")
#: Heads drawn as a QA phantom's dry skull (see RegionSpec.dry_skull).
DRY_SKULL_FRACTION = 0.2
#: Chests whose cranial slices show the thoracic inlet (see RegionSpec.inlet).
INLET_FRACTION = 0.7

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
    dry_skull
        Heads only: a QA phantom's dry skull, bone in air with air inside it (no scalp,
        no brain), as in the real stereotactic head phantom.
    inlet
        Chest only: the cranial slices show the thoracic inlet (lower neck, shoulders,
        apices; :mod:`analysis.phantoms.inlet`), as real chest protocols start there.
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
    dry_skull: bool = False
    inlet: bool = False

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


def region_index(region: str) -> int:
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
    index = region_index(region)
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
    # Drawn last, so that every other field is what it was before heads could be dry.
    drawn["dry_skull"] = bool(rng.uniform() < DRY_SKULL_FRACTION) and head
    drawn["inlet"] = bool(rng.uniform() < INLET_FRACTION) and region == "chest"
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
    validate_spec(spec)
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
        return 2.0 * head_semi_axes(size, aspect)[1]
    lr = trunk_semi_axes(size, aspect)[1]
    return 2.0 * lr * (1.1 if region == "pelvis" else 1.0)


def head_semi_axes(size: float, aspect: float) -> tuple[float, float]:
    """(AP, LR) of the head: it varies much less with body size than the trunk."""
    ap = 95.0 * (0.78 + 0.2 * min(size, 1.1))
    return ap, ap * aspect


def trunk_semi_axes(size: float, aspect: float) -> tuple[float, float]:
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


def validate_spec(spec: RegionSpec) -> None:
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


def _region_length_mm(spec: RegionSpec) -> float:
    return _REGION_LENGTH_MM[spec.region] * (0.6 + 0.4 * min(spec.size, 1.15))


def slice_positions(spec: RegionSpec) -> np.ndarray:
    """Each slice's ``t``: evenly over the coverage."""
    start, stop = spec.coverage
    if spec.slices == 1:
        return np.array([start])
    if stop - start < 1e-6:
        # A thin coverage: adjacent slices, their spacing apart, around ``start``.
        half = (spec.slices - 1) * spec.slice_thickness_mm / _region_length_mm(spec) / 2
        start, stop = max(0.0, start - half), min(1.0, start + half)
    return np.linspace(start, stop, spec.slices)
