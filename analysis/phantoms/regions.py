"""Generated CT phantoms of four anatomical regions: head, chest, abdomen and pelvis.

Training and test data for the region classifier (:mod:`analysis.region`). Each phantom
is drawn from a seed with realistic variety in the patient and the protocol (see
:func:`random_region_spec`); this module is the entry point and adds what every region
shares: scanner blur, noise and reconstruction circle, body shape along z, and the table
or head holder. The parts, from the bottom up:

- :mod:`analysis.phantoms.region_specs`: regions, labels, :class:`RegionSpec` and slice
  positions;
- :mod:`analysis.phantoms.canvas`: drawing primitives;
- :mod:`analysis.phantoms.torso`: trunk anatomy the abdomen, pelvis and chest share;
- :mod:`analysis.phantoms.head`, :mod:`~analysis.phantoms.abdomen`,
  :mod:`~analysis.phantoms.pelvis`: each region slice by slice;
- :mod:`analysis.phantoms.chest`: :func:`analysis.phantoms.trunk.make_phantom`'s chest,
  dressed with ribs, scapulae, sternum, heart, aorta and liver dome.

Conventions are those of :mod:`analysis.phantoms.trunk`: ``(slices, rows, columns)``, slice
index increasing towards the feet, rows towards the patient's back (+y in LPS) and
columns towards the patient's left (+x). Numpy (and OpenCV for the blur) only.

Anatomy is parameterised by ``t``, the position along the region's cranio-caudal
extent: 0 at its cranial end (vertex, lung apices, diaphragm dome, iliac crest), 1 at
its caudal end (skull base, lung bases, iliac crest, upper thighs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from analysis.phantoms.abdomen import draw_abdomen_slice
from analysis.phantoms.canvas import Canvas
from analysis.phantoms.chest import draw_chest
from analysis.phantoms.head import draw_head_slice, head_anatomy
from analysis.phantoms.pelvis import draw_pelvis_slice
from analysis.phantoms.region_specs import (
    LABEL_BLADDER,
    LABEL_BONE,
    LABEL_BRAIN,
    LABEL_GAS,
    LABEL_KIDNEY,
    LABEL_LIVER,
    LABEL_SPLEEN,
    PADDING_HU,
    PHANTOM_REGIONS,
    RegionPhantom,
    RegionSpec,
    head_semi_axes,
    random_region_spec,
    region_index,
    slice_positions,
    trunk_semi_axes,
    validate_spec,
)
from analysis.phantoms.torso import trunk_anatomy
from analysis.phantoms.trunk import (
    AIR_HU,
    LABEL_BODY,
    LABEL_LUNG_LEFT,
    LABEL_LUNG_RIGHT,
    TABLE_HU,
)
from analysis.types import ImageVolume

# The public names, importable from here whichever module defines them; the labels are
# all a region phantom carries, trunk's body and lungs included.
__all__ = [
    "LABEL_BLADDER",
    "LABEL_BODY",
    "LABEL_BONE",
    "LABEL_BRAIN",
    "LABEL_GAS",
    "LABEL_KIDNEY",
    "LABEL_LIVER",
    "LABEL_LUNG_LEFT",
    "LABEL_LUNG_RIGHT",
    "LABEL_SPLEEN",
    "PADDING_HU",
    "PHANTOM_REGIONS",
    "RegionPhantom",
    "RegionSpec",
    "draw_region_phantom",
    "make_region_phantom",
    "phantom_volume",
    "random_region_spec",
]

#: In a dry skull, what is below this (scalp, brain, orbits) is air.
DRY_BONE_HU = 250.0

# Per-region anatomy (one patient) and slice drawers; the chest is drawn apart
# (draw_chest), on analysis.phantoms.trunk's phantom.
_ANATOMY: dict[str, Callable[[RegionSpec, np.random.Generator], object]] = {
    "head": head_anatomy,
    "abdomen": trunk_anatomy,
    "pelvis": trunk_anatomy,
}
_SLICE_DRAWERS: dict[str, Callable[[Canvas, float, RegionSpec, object], None]] = {
    "head": draw_head_slice,  # type: ignore[dict-item]
    "abdomen": draw_abdomen_slice,  # type: ignore[dict-item]
    "pelvis": draw_pelvis_slice,  # type: ignore[dict-item]
}


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
    validate_spec(spec)
    index = region_index(spec.region)
    rng = np.random.default_rng([spec.seed, index, 2])
    if spec.region == "chest":
        hu, labels = draw_chest(spec, rng)
    else:
        draw_slice = _SLICE_DRAWERS[spec.region]
        hu = np.full((spec.slices, spec.matrix, spec.matrix), AIR_HU, dtype=np.float32)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        anatomy = _ANATOMY[spec.region](spec, rng)
        for k, t in enumerate(slice_positions(spec)):
            canvas = Canvas(hu[k], labels[k], spec.pixel_spacing_mm, spec.offset_mm)
            draw_slice(canvas, float(t), spec, anatomy)
            if spec.dry_skull:
                _dry(hu[k], labels[k])
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


def _dry(hu: np.ndarray, labels: np.ndarray) -> None:
    """In place: everything of the head below bone density becomes air (a dry skull)."""
    soft = (labels > 0) & (hu < DRY_BONE_HU)
    hu[soft] = AIR_HU
    labels[soft & (labels != LABEL_BONE)] = LABEL_BODY


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
    for k, t in enumerate(slice_positions(spec)):
        sy, sx = 1.0 + trend * (t - 0.5) + bump * math.sin(math.pi * t)
        if abs(sy - 1.0) < 1e-3 and abs(sx - 1.0) < 1e-3:
            continue
        m = np.array([[sx, 0.0, (1 - sx) * centre[0]], [0.0, sy, (1 - sy) * centre[1]]])
        hu[k] = cv2.warpAffine(hu[k], m, size, flags=cv2.INTER_LINEAR, borderValue=AIR_HU)
        labels[k] = cv2.warpAffine(labels[k], m, size, flags=cv2.INTER_NEAREST, borderValue=0)


def _draw_support(canvas: Canvas, spec: RegionSpec) -> None:
    """Table under the trunk, thin curved head holder under the head (not patient)."""
    if not spec.table:
        return
    if spec.region == "head":
        ap, lr = head_semi_axes(spec.size, spec.aspect)
        canvas.ellipse(8.0, 0.0, ap + 14.0, lr + 14.0, AIR_HU, rim=(3.0, 150.0), within=[0])
        # Keep the holder's lower half only: a cradle, open towards the face.
        box = canvas.bounding_box(-ap - 20.0, 0.0, ap + 20.0, lr + 20.0)
        if box is not None:
            clear = canvas.labels[box] == 0
            canvas.hu[box][clear] = AIR_HU
        return
    ap, lr = trunk_semi_axes(spec.size, spec.aspect)
    width = min(lr * 1.25, 260.0)
    top = ap + 12.0
    box = canvas.bounding_box(top + 5.0, 0.0, 5.0, width)
    if box is not None:
        canvas.hu[box] = np.where(canvas.labels[box] == 0, TABLE_HU, canvas.hu[box])
