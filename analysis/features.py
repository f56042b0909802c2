"""Hand-crafted features of a CT series and of a segment, in physical units.

Two uses: the region classifier (:mod:`analysis.region`) describes a whole series by
:func:`series_features`; measurement reports can describe a segment by
:func:`analysis.segment_features.segment_features`. Both combine

* first-order statistics of the Hounsfield units (moments, percentiles, histogram
  entropy on fixed 20 HU bins, fractions of the air, lung, fat, soft-tissue and bone
  ranges),
* shape, in mm and cm² (cross-section size, elongation, solidity, their variation
  along the series; for the series also internal air and how bone is arranged around
  the outline, which separates a skull ring from ribs and from a pelvis),
* grey-level co-occurrence (GLCM) texture from scikit-image's ``graycomatrix`` /
  ``graycoprops`` on a windowed, quantised image.

Everything is computed on slices resampled to a fixed in-plane grid (2 mm for a
series, 1 mm for a segment), so a feature does not depend on the pixel spacing; a
series is sampled at no more than 16 evenly spaced slices, so a 200x512x512 volume
takes well under a second. Features that need several slices (variation along z)
are 0 for a single slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import stats

from analysis.segment import (
    fill_holes_slicewise,
    morph_slicewise,
    segment_body,
)
from analysis.texture import GLCM_PROPS, GLCM_WINDOWS, glcm_features
from analysis.types import ImageVolume

#: Stored CT values span -1024..3071 HU; padding outside the reconstruction circle
#: (-2000, -3024) is clipped to air so it never counts as very dark tissue.
HU_RANGE = (-1024.0, 3071.0)
#: In-plane grid of the series features, and the slices sampled at most.
SERIES_GRID_MM = 2.0
SERIES_MAX_SLICES = 16
#: (name, low, high) HU ranges whose fractions are features.
TISSUE_RANGES: tuple[tuple[str, float, float], ...] = (
    ("air", -1024.0, -900.0),
    ("lung", -900.0, -500.0),
    ("fat", -200.0, -30.0),
    ("soft", -30.0, 100.0),
    ("dense", 100.0, 300.0),
    ("bone", 300.0, math.inf),
    ("cortical", 700.0, math.inf),
)
_AIR_HU = -400.0
_BONE_HU = 300.0
_RING_BONE_HU = 200.0
#: A trachea lies within this of the body's lateral centre.
AIRWAY_MIDLINE_MM = 20.0
#: Internal air below this area (per slice, or in all sampled slices) has no meaningful
#: sides or median.
_MIN_AIR_MM2 = 200.0
#: A slice whose body outline runs along the image edge for more than this fraction
#: is cut by the field of view (see :func:`edge_contact`).
FOV_CUT_CONTACT = 0.3
_HIST_BINS = np.arange(HU_RANGE[0], 2000.0 + 20.0, 20.0)
_FIRST_ORDER = ("mean", "std", "skewness", "kurtosis", "p05", "p25", "p50", "p75", "p95", "entropy")

#: What :func:`series_features` returns, in this order (a model's input columns).
SERIES_FEATURES: tuple[str, ...] = (
    *[f"hu_{n}" for n in _FIRST_ORDER],
    *[f"frac_{name}" for name, _, _ in TISSUE_RANGES],
    "area_cm2_median",
    "area_cm2_max",
    "area_cv",
    "area_range_rel",
    "major_mm_median",
    "minor_mm_median",
    "aspect_median",
    "eccentricity_median",
    "solidity_median",
    "components_median",
    "equivalent_diameter_mm",
    "z_extent_mm",
    "air_frac",
    "air_largest_frac_median",
    "air_largest_frac_max",
    "air_blobs_median",
    "air_median_hu",
    "air_bilateral_median",
    "airway_frac",
    "bone_area_frac_median",
    "bone_depth_mm_median",
    "bone_depth_rel_median",
    "bone_periphery_frac",
    "bone_ring_coverage_median",
    "bone_components_median",
    "bone_enclosed_frac_median",
    "fov_cut_frac",
    *[f"glcm_{w}_{p}" for w, _, _ in GLCM_WINDOWS for p in GLCM_PROPS],
)


class NoBodyError(ValueError):
    """The series shows no body (nothing above the body threshold)."""


@dataclass(frozen=True)
class _Sampled:
    """The sampled, resampled slices features are computed on."""

    hu: np.ndarray  # float32 (k, rows, columns) on the grid
    body: np.ndarray  # bool, same shape
    grid_mm: float  # in-plane spacing of hu
    slice_step_mm: float  # distance between sampled slices (the series' if one slice)
    lateral_axis: int  # 1 or 2: which in-plane axis runs left-right in the patient
    posterior_sign: float  # +1 if the other in-plane index grows towards the back, else -1
    z_extent_mm: float


# ------------------------------------------------------------------------ first order


def first_order(values: np.ndarray, prefix: str = "hu") -> dict[str, float]:
    """Moments, percentiles, entropy and tissue-range fractions of HU values.

    Parameters
    ----------
    values
        1D HU values (clipped to :data:`HU_RANGE` here).
    prefix
        Feature name prefix.

    Returns
    -------
    dict
        ``{prefix}_mean``, ``_std``, ``_skewness``, ``_kurtosis`` (excess),
        ``_p05`` ... ``_p95``, ``_entropy`` (bits, 20 HU bins) and ``frac_{range}`` for
        each of :data:`TISSUE_RANGES`; zeros for no values.
    """
    names = [f"{prefix}_{n}" for n in _FIRST_ORDER]
    names += [f"frac_{name}" for name, _, _ in TISSUE_RANGES]
    if values.size == 0:
        return dict.fromkeys(names, 0.0)
    v = np.clip(values.astype(np.float64, copy=False), *HU_RANGE)
    mean, std = float(v.mean()), float(v.std())
    if std > 1e-6:
        # Population moments (bias=True) and excess kurtosis (fisher=True): the shipped
        # region model was trained on these.
        skew = float(stats.skew(v, bias=True))
        kurt = float(stats.kurtosis(v, fisher=True, bias=True))
    else:
        skew = kurt = 0.0  # scipy says NaN for constant values
    p = np.percentile(v, [5, 25, 50, 75, 95])
    hist, _ = np.histogram(v, bins=_HIST_BINS)
    prob = hist[hist > 0] / max(hist.sum(), 1)
    entropy = float(-(prob * np.log2(prob)).sum())
    out = dict(zip(names[:10], [mean, std, skew, kurt, *map(float, p), entropy], strict=True))
    for name, low, high in TISSUE_RANGES:
        out[f"frac_{name}"] = float(np.mean((v >= low) & (v < high)))
    return out


# ------------------------------------------------------------------------------ series


def series_features(
    volume: ImageVolume,
    body: np.ndarray | None = None,
    *,
    max_slices: int = SERIES_MAX_SLICES,
    grid_mm: float = SERIES_GRID_MM,
) -> dict[str, float]:
    """Features describing a whole CT series, for region classification.

    Parameters
    ----------
    volume
        The series in HU (any spacing, one or more slices).
    body
        The body mask from :func:`analysis.segment.segment_body` on ``volume``'s grid, if
        already computed; otherwise the body is segmented here on the sampled slices.
    max_slices
        Evenly spaced slices sampled at most.
    grid_mm
        In-plane grid the slices are resampled to.

    Returns
    -------
    dict
        One finite float per name of :data:`SERIES_FEATURES`, in that order.

    Raises
    ------
    NoBodyError
        No body on any sampled slice.
    """
    sampled = _sample(volume, body, max_slices=max_slices, grid_mm=grid_mm)
    hu, mask = sampled.hu, sampled.body
    out: dict[str, float] = {}
    values = hu[mask]
    step = max(1, values.size // 200_000)  # a regular subsample keeps percentiles honest
    out.update(first_order(values[::step]))
    out.update(_shape_features(sampled))
    out.update(_air_features(sampled))
    out.update(_bone_features(sampled))
    out["fov_cut_frac"] = float(np.mean([edge_contact(m) > FOV_CUT_CONTACT for m in mask]))
    picks = _representative(mask)
    for name, center, width in GLCM_WINDOWS:
        out.update(
            glcm_features(
                [hu[k] for k in picks],
                [mask[k] for k in picks],
                center=center,
                width=width,
                prefix=f"glcm_{name}",
            )
        )
    return {name: finite_or_zero(out[name]) for name in SERIES_FEATURES}


def feature_vector(features: Mapping[str, float], names: Sequence[str] = ()) -> np.ndarray:
    """``features`` as a float64 row in the order of ``names`` (default :data:`SERIES_FEATURES`).

    Raises
    ------
    KeyError
        A name is missing from ``features``.
    """
    names = names or SERIES_FEATURES
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"features missing: {', '.join(missing)}")
    return np.array([float(features[n]) for n in names], dtype=np.float64)


def finite_or_zero(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def _sample(
    volume: ImageVolume, body: np.ndarray | None, *, max_slices: int, grid_mm: float
) -> _Sampled:
    n = volume.hu.shape[0]
    picks = np.unique(np.rint(np.linspace(0, n - 1, min(n, max_slices))).astype(int))
    dz, dy, dx = volume.spacing_mm
    rows = max(8, round(volume.hu.shape[1] * dy / grid_mm))
    columns = max(8, round(volume.hu.shape[2] * dx / grid_mm))
    hu = np.clip(volume.hu[picks], *HU_RANGE).astype(np.float32, copy=False)
    hu = _resize(hu, rows, columns)
    # The grid's actual spacing, rounded sizes included (rows and columns alike).
    grid = float(np.sqrt(volume.hu.shape[1] * dy / rows * volume.hu.shape[2] * dx / columns))
    step = dz * (picks[1] - picks[0]) if len(picks) > 1 else dz
    if body is not None:
        if body.shape != volume.hu.shape:
            raise ValueError(
                f"body mask shape {body.shape} differs from the volume's {volume.hu.shape}"
            )
        mask = _resize(body[picks].astype(np.float32), rows, columns) > 0.5
    else:
        mask = segment_body(hu, (float(step), grid, grid))
    mask = _close_outline(mask, grid)
    if not mask.any():
        raise NoBodyError(
            "no body found in the series (nothing above -500 HU that looks like a patient)"
        )
    keep = mask.any(axis=(1, 2))
    z_extent = float(dz * (picks[keep][-1] - picks[keep][0]) + dz)
    return _Sampled(
        hu=hu[keep],
        body=mask[keep],
        grid_mm=grid,
        slice_step_mm=float(step),
        lateral_axis=_lateral_axis(volume.affine),
        posterior_sign=_posterior_sign(volume.affine),
        z_extent_mm=z_extent,
    )


def _resize(stack: np.ndarray, rows: int, columns: int) -> np.ndarray:
    if stack.shape[1:] == (rows, columns):
        return stack.copy()
    shrinking = rows * columns < stack.shape[1] * stack.shape[2]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.stack(
        [
            cv2.resize(np.ascontiguousarray(s), (columns, rows), interpolation=interpolation)
            for s in stack
        ]
    )


def _close_outline(mask: np.ndarray, grid_mm: float) -> np.ndarray:
    """Fill what a nearly closed outline encloses.

    A thin skull (or a QA phantom's shell) can break under segment_body's opening or
    the resampling; its interior is then not filled, and a head would look like a ring
    of bone with nothing inside. The gaps are bridged by a closing to find what they
    enclose, but the bridges themselves (say, air between an arm and the trunk) are
    not added.
    """
    radius = max(1, round(8.0 / grid_mm))
    closed = morph_slicewise(mask, cv2.MORPH_CLOSE, radius)
    return mask | (fill_holes_slicewise(closed) & ~closed)


def _posterior_sign(affine: np.ndarray) -> float:
    """+1 when the in-plane axis that is not the lateral one runs towards the back (+y)."""
    ap_axis = 3 - _lateral_axis(affine)
    return 1.0 if affine[1, ap_axis] >= 0 else -1.0


def _lateral_axis(affine: np.ndarray) -> int:
    """The in-plane axis (1 rows, 2 columns) closest to the patient's left-right."""
    return 1 if abs(affine[0, 1]) > abs(affine[0, 2]) else 2


def _representative(mask: np.ndarray, count: int = 3) -> list[int]:
    """Slices at the quartiles of the sampled ones (the middle one for few slices)."""
    n = mask.shape[0]
    if n <= count:
        return list(range(n))
    return sorted({round(q * (n - 1)) for q in (0.25, 0.5, 0.75)})


# ---------------------------------------------------------------------------- shape


def _slice_shape(
    mask2d: np.ndarray, grid_mm: float
) -> tuple[float, float, float, float, float, int]:
    """Area (cm²), major and minor axis (mm), eccentricity, solidity, large components."""
    m = mask2d.astype(np.uint8)
    moments = cv2.moments(m, binaryImage=True)
    area_px = moments["m00"]
    if area_px < 1:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0
    mu20, mu02, mu11 = (
        moments["mu20"] / area_px,
        moments["mu02"] / area_px,
        moments["mu11"] / area_px,
    )
    common = math.sqrt(max(0.0, ((mu20 - mu02) / 2) ** 2 + mu11**2))
    l1, l2 = (mu20 + mu02) / 2 + common, max((mu20 + mu02) / 2 - common, 0.0)
    # An ellipse with semi-axis a has variance a² / 4 along it.
    major, minor = 4.0 * math.sqrt(l1) * grid_mm, 4.0 * math.sqrt(l2) * grid_mm
    ecc = math.sqrt(max(0.0, 1.0 - l2 / l1)) if l1 > 0 else 0.0
    points = cv2.findNonZero(m)
    hull_area = (
        cv2.contourArea(cv2.convexHull(points)) if points is not None and len(points) >= 3 else 0.0
    )
    solidity = min(1.0, area_px / hull_area) if hull_area > 0 else 1.0
    _, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    large = int(np.sum(stats[1:, cv2.CC_STAT_AREA] * grid_mm**2 >= 500.0))  # >= 5 cm²
    return area_px * grid_mm**2 / 100.0, major, minor, ecc, solidity, large


def _shape_features(s: _Sampled) -> dict[str, float]:
    rows = np.array([_slice_shape(m, s.grid_mm) for m in s.body], dtype=np.float64)
    area, major, minor, ecc, solidity, components = rows.T
    mean_area = float(area.mean())
    return {
        "area_cm2_median": float(np.median(area)),
        "area_cm2_max": float(area.max()),
        "area_cv": float(area.std() / mean_area) if len(area) > 1 and mean_area > 0 else 0.0,
        "area_range_rel": float((area.max() - area.min()) / mean_area) if mean_area > 0 else 0.0,
        "major_mm_median": float(np.median(major)),
        "minor_mm_median": float(np.median(minor)),
        "aspect_median": float(np.median(minor / np.maximum(major, 1e-6))),
        "eccentricity_median": float(np.median(ecc)),
        "solidity_median": float(np.median(solidity)),
        "components_median": float(np.median(components)),
        "equivalent_diameter_mm": float(2.0 * math.sqrt(float(np.median(area)) * 100.0 / math.pi)),
        "z_extent_mm": s.z_extent_mm,
    }


# ---------------------------------------------------------------------- field of view


def edge_contact(body: np.ndarray) -> float:
    """The fraction of a slice's body outline that is the image's edge.

    A body the reconstruction's field of view cuts (a crop around a limb or a tumour,
    a small cardiac field of view) runs into the image edge along a long stretch of
    its outline; a whole cross-section touches it at most where an arm or the table
    reaches the side (a few per cent).
    """
    if not body.any():
        return 0.0
    m = body.astype(np.uint8)
    # Outline pixels: body pixels with a non-body 4-neighbour, the outside of the image
    # counting as non-body, so the edge stretches are outline too.
    padded = np.pad(m, 1)
    inner = cv2.erode(padded, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0)[1:-1, 1:-1]
    outline = m.astype(bool) & ~inner.astype(bool)
    on_edge = np.zeros_like(outline)
    on_edge[0, :] = on_edge[-1, :] = True
    on_edge[:, 0] = on_edge[:, -1] = True
    total = int(outline.sum())
    return float((outline & on_edge).sum() / total) if total else 0.0


# ------------------------------------------------------------------------------ air


def _air_features(s: _Sampled) -> dict[str, float]:
    """Air inside the body: how much, in how big pieces, how dark, on both sides or not."""
    # Skin-deep air is partial volume at the outline, not internal air.
    inner = morph_slicewise(s.body, cv2.MORPH_ERODE, max(1, round(3.0 / s.grid_mm)))
    air = (s.hu < _AIR_HU) & inner
    body_px = s.body.sum(axis=(1, 2)).astype(np.float64)
    largest, blobs, bilateral, airway = [], [], [], []
    for k in range(air.shape[0]):
        _, _, stats, centroids = cv2.connectedComponentsWithStats(
            air[k].astype(np.uint8), connectivity=8
        )
        airway.append(_has_airway(stats[1:], centroids[1:], s.body[k], s))
        areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
        largest.append(areas.max() / body_px[k] if areas.size and body_px[k] else 0.0)
        blobs.append(float(np.sum(areas * s.grid_mm**2 >= 50.0)))  # >= 0.5 cm²
        # Too little air to have sides: a few noisy pixels would swing the ratio.
        enough = air[k].sum() * s.grid_mm**2 >= _MIN_AIR_MM2
        bilateral.append(_bilateral(air[k], s.body[k], s.lateral_axis - 1) if enough else 0.0)
    air_px = air.sum()
    return {
        "air_frac": float(air_px / max(body_px.sum(), 1.0)),
        "air_largest_frac_median": float(np.median(largest)),
        "air_largest_frac_max": float(np.max(largest)),
        "air_blobs_median": float(np.median(blobs)),
        # Lung (vessels, septa) is about -850 HU, gas in the gut or sinuses -1000.
        "air_median_hu": float(np.median(s.hu[air]))
        if air_px * s.grid_mm**2 >= _MIN_AIR_MM2
        else 0.0,
        "air_bilateral_median": float(np.median(bilateral)),
        "airway_frac": float(np.mean(airway)),
    }


def _has_airway(stats: np.ndarray, centroids: np.ndarray, body: np.ndarray, s: _Sampled) -> bool:
    """A trachea-like air section: 0.5-8 cm², on the midline, in front of the body's centre.

    It marks the neck and the chest; gas in the rectum lies on the midline too, but
    behind the centre, and bowel gas is rarely that small, round and central.
    """
    if not len(stats) or not body.any():
        return False
    # OpenCV centroids are (column, row); lateral_axis 2 means the columns run left-right.
    lat_col = 0 if s.lateral_axis == 2 else 1
    coords = np.nonzero(body)
    body_lat = float(coords[s.lateral_axis - 1].mean())
    body_ap = float(coords[2 - s.lateral_axis].mean())
    areas = stats[:, cv2.CC_STAT_AREA] * s.grid_mm**2
    sizes = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) * s.grid_mm
    central = np.abs(centroids[:, lat_col] - body_lat) * s.grid_mm <= AIRWAY_MIDLINE_MM
    anterior = (centroids[:, 1 - lat_col] - body_ap) * s.posterior_sign < 0
    fits = (areas >= 50.0) & (areas <= 800.0) & (sizes <= 40.0) & central & anterior
    return bool(fits.any())


def _bilateral(air: np.ndarray, body: np.ndarray, axis: int) -> float:
    """min/max of the air on either side of the body's centre: ~1 for two lungs."""
    if not air.any():
        return 0.0
    coords = np.nonzero(body)[axis]
    centre = coords.mean()
    positions = np.nonzero(air)[axis]
    left, right = float(np.sum(positions < centre)), float(np.sum(positions >= centre))
    return min(left, right) / max(left, right)


# ----------------------------------------------------------------------------- bone


def _bone_features(s: _Sampled) -> dict[str, float]:
    """Where bone lies relative to the outline: a skull is a ring just under the skin,
    ribs are scattered around the wall deeper, spine and pelvis lie deep inside."""
    # A 3x3 median first: noise on contrast-filled vessels and heart (150-350 HU)
    # would otherwise scatter bone-like specks.
    smooth = np.stack([cv2.medianBlur(np.ascontiguousarray(h), 3) for h in s.hu])
    bone = (smooth > _BONE_HU) & s.body
    depths, coverage, components, area_frac = [], [], [], []
    # Unsmoothed, at a lower threshold and not only within the body: a thin skull
    # shell at 2 mm pixels is partial-volumed, broken by the median, and a dry skull's
    # can fall out of the body mask.
    enclosed = enclosed_by_bone(s.hu > _RING_BONE_HU, s.body, s.grid_mm)
    for k in range(bone.shape[0]):
        body = s.body[k].astype(np.uint8)
        depth = cv2.distanceTransform(body, cv2.DIST_L2, 5) * s.grid_mm
        b = bone[k]
        area_frac.append(b.sum() / max(body.sum(), 1))
        if b.any():
            depths.append(depth[b])
        # "Peripheral" relative to the body's size: a skull lies about a tenth of the
        # head's radius under its outline, ribs a fifth to a quarter of the trunk's;
        # spine and pelvis lie deeper.
        radius_k = math.sqrt(body.sum() / math.pi) * s.grid_mm
        coverage.append(_ring_coverage(b & (depth < 0.3 * radius_k), body))
        _, _, stats, _ = cv2.connectedComponentsWithStats(b.astype(np.uint8), connectivity=8)
        components.append(float(np.sum(stats[1:, cv2.CC_STAT_AREA] * s.grid_mm**2 >= 8.0)))
    all_depths = np.concatenate(depths) if depths else np.zeros(0)
    radius = math.sqrt(float(np.median(s.body.sum(axis=(1, 2)))) * s.grid_mm**2 / math.pi)
    return {
        "bone_area_frac_median": float(np.median(area_frac)),
        "bone_depth_mm_median": float(np.median(all_depths)) if all_depths.size else 0.0,
        "bone_depth_rel_median": float(np.median(all_depths) / radius)
        if all_depths.size and radius
        else 0.0,
        "bone_periphery_frac": float(np.mean(all_depths < 0.2 * radius))
        if all_depths.size
        else 0.0,
        "bone_ring_coverage_median": float(np.median(coverage)),
        "bone_components_median": float(np.median(components)),
        "bone_enclosed_frac_median": float(np.median(enclosed)),
    }


def enclosed_by_bone(bone: np.ndarray, body: np.ndarray, grid_mm: float) -> np.ndarray:
    """Per slice, the fraction of the body (with what bone encloses) inside a closed bone ring.

    A skull is a closed ring whatever it holds (brain, or air in a dry-skull phantom,
    which the body mask may then miss: hence the union); ribs leave centimetre gaps
    and enclose nothing but the spinal canal, a long bone only its marrow. Gaps up to
    about 4 mm (sutures, a thin squama at 2 mm pixels) are bridged.
    """
    closed = morph_slicewise(bone, cv2.MORPH_CLOSE, max(1, round(2.0 / grid_mm)))
    inside = fill_holes_slicewise(closed) & ~closed
    whole = np.maximum((body | inside | closed).sum(axis=(1, 2)), 1)
    return inside.sum(axis=(1, 2)) / whole


def _ring_coverage(peripheral_bone: np.ndarray, body: np.ndarray, sectors: int = 36) -> float:
    """Fraction of angular sectors around the body's centroid holding peripheral bone."""
    if not peripheral_bone.any():
        return 0.0
    cy, cx = (c.mean() for c in np.nonzero(body))
    ys, xs = np.nonzero(peripheral_bone)
    angles = np.arctan2(ys - cy, xs - cx)
    bins = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * sectors).astype(int) % sectors)
    return len(bins) / sectors
