"""Training and evaluation slices for the body-and-lungs segmentation model.

Slices come from generated phantoms (:mod:`analysis.phantoms.trunk`) drawn from a seed with
realistic variety, and optionally from real CT folders labelled by the reference
procedure of :mod:`analysis.reference` with the series' hand-checked corrections (or,
asked for, by the classical ``ct-body-lungs`` pipeline). Every slice is put on the model's grid by
:mod:`analysis.slice_grid`, exactly as at inference. Targets are class indices:
0 background, 1 body (not lung), 2 left lung, 3 right lung, as the phantoms label them.

Kinds of phantom volume, so the model learns what is *not* lung as well as what is:

* ``chest``: lungs throughout, with or without ribs, heart, diaphragm domes, disease.
* ``base``: lung bases beside stomach gas under the domes, then abdomen with bowel gas.
* ``abdomen``: no lungs, stomach and bowel gas (gas inside the body is not lung).
* ``head``: skull, sinuses and mastoid air, sometimes a stereotactic frame; no lungs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from analysis import slice_grid
from analysis.phantoms.trunk import (
    AIR_HU,
    BONE_HU,
    FAT_HU,
    SOFT_TISSUE_HU,
    TABLE_HU,
    PhantomSpec,
    make_phantom,
)
from analysis.slice_grid import GridSpec

if TYPE_CHECKING:
    from analysis.corrections import Corrections

KINDS = ("chest", "base", "abdomen", "head")
#: Share of each kind among generated volumes.
KIND_WEIGHTS = (0.35, 0.35, 0.18, 0.12)
#: Output classes of the targets.
CLASSES = ("background", "body", "lung_left", "lung_right")
#: How real training series are labelled (see :func:`real_slices`).
REAL_LABELS = ("reference", "classical")


@dataclass(frozen=True)
class Volume:
    """One generated volume at its own (source) grid, with its labels."""

    kind: str
    hu: np.ndarray  # float32 (slices, rows, columns), standard orientation
    labels: np.ndarray  # uint8, same shape: 0 background, 1 body, 2 left, 3 right lung
    pixel_spacing_mm: float
    slice_thickness_mm: float


@dataclass
class SliceSet:
    """Slices on the model grid: ``x`` windowed float16, ``y`` class indices."""

    x: np.ndarray  # float16 (n, size, size)
    y: np.ndarray  # uint8 (n, size, size)

    @classmethod
    def concatenate(cls, parts: Sequence[SliceSet], size: int) -> SliceSet:
        if not parts:
            return cls(np.zeros((0, size, size), np.float16), np.zeros((0, size, size), np.uint8))
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    def __len__(self) -> int:
        return int(self.x.shape[0])


# ------------------------------------------------------------------------ phantoms


def _pick_kind(rng: np.random.Generator) -> str:
    return str(rng.choice(KINDS, p=KIND_WEIGHTS))


def _matrix_and_spacing(rng: np.random.Generator, fov_mm: tuple[float, float]) -> tuple[int, float]:
    matrix = int(rng.choice([256, 384, 512], p=[0.35, 0.15, 0.5]))
    return matrix, float(rng.uniform(*fov_mm)) / matrix


def random_trunk_spec(kind: str, rng: np.random.Generator, slices: int) -> PhantomSpec:
    """A chest, lung-base or abdomen phantom spec drawn from ``rng``."""
    matrix, spacing = _matrix_and_spacing(rng, (300.0, 500.0))
    fov = matrix * spacing
    ap = float(rng.uniform(80.0, 150.0))
    lr = float(np.clip(ap * rng.uniform(1.15, 1.7), 110.0, 0.47 * fov))
    diaphragm = kind != "chest" or bool(rng.uniform() < 0.4)
    fx = float(rng.uniform(0.28, 0.36))
    right_dome = float(rng.uniform(0.45, 0.7))
    left_dome = min(0.9, right_dome + float(rng.uniform(0.0, 0.12)))
    return PhantomSpec(
        slices=slices,
        rows=matrix,
        columns=matrix,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=float(rng.choice([1.0, 1.25, 2.5, 3.0, 5.0])),
        body_semi_axes_mm=(ap, lr),
        lungs=kind != "abdomen",
        stomach_gas=kind != "chest" or bool(rng.uniform() < 0.3),
        bowel_gas=kind != "chest" and bool(rng.uniform() < 0.8),
        noise_hu=float(rng.uniform(3.0, 40.0)),
        seed=int(rng.integers(0, 2**31 - 1)),
        consolidation=bool(rng.uniform() < 0.5),
        ground_glass=bool(rng.uniform() < 0.3),
        trachea=kind == "chest" and bool(rng.uniform() < 0.6),
        arms=bool(rng.uniform() < 0.4),
        body_exponent=float(rng.uniform(1.8, 3.0)),
        body_offset_mm=(float(rng.uniform(-15.0, 30.0)), float(rng.uniform(-25.0, 25.0))),
        fat_mm=float(rng.uniform(4.0, min(35.0, 0.25 * ap))),
        table=bool(rng.uniform() < 0.85),
        pad_mm=float(rng.choice([0.0, rng.uniform(15.0, 60.0)])),
        pad_hu=float(rng.uniform(-960.0, -750.0)),
        arm_gap_mm=float(rng.uniform(3.0, 25.0)),
        lung_semi_axes=(float(rng.uniform(0.6, 0.78)), fx),
        lung_centre_x=float(rng.uniform(0.4, min(0.5, 0.82 - fx))),
        lung_taper=float(rng.uniform(0.2, 0.45) if diaphragm else rng.uniform(0.5, 0.9)),
        lung_extent=float(rng.uniform(0.35, 0.75)) if kind == "base" else 1.0,
        lung_hu=float(rng.uniform(-920.0, -780.0)),
        lung_gradient_hu=float(rng.uniform(0.0, 120.0)),
        vessels_per_slice=int(rng.integers(3, 11)),
        ribs=bool(rng.uniform() < 0.7),
        heart=kind != "abdomen" and bool(rng.uniform() < 0.7),
        heart_hu=float(rng.choice([SOFT_TISSUE_HU, rng.uniform(120.0, 300.0)])),
        diaphragm=diaphragm,
        dome_top=(right_dome, left_dome),
        dome_centre_y=float(rng.uniform(-0.25, 0.0)),
        dome_size=float(rng.uniform(0.85, 1.2)),
        blur_mm=float(rng.uniform(0.0, 1.2)),
        consolidation_site=_disease_site(rng, (15.0, 45.0)),
        consolidation_hu=float(rng.uniform(0.0, 70.0)),
        ground_glass_site=_disease_site(rng, (12.0, 35.0)),
    )


def _disease_site(rng: np.random.Generator, radius_mm: tuple[float, float]) -> tuple[int, float, float]:
    """Either lung, anywhere round its edge, dependent (posterior) parts more often."""
    side = int(rng.choice([-1, 1]))
    angle = float(rng.uniform(0.0, 180.0) if rng.uniform() < 0.7 else rng.uniform(-180.0, 0.0))
    return side, angle, float(rng.uniform(*radius_mm))


def trunk_volume(kind: str, rng: np.random.Generator, slices: int) -> Volume:
    """A generated chest, lung-base or abdomen volume."""
    spec = random_trunk_spec(kind, rng, slices)
    phantom = make_phantom(spec)
    hu, labels = phantom.hu, phantom.labels
    if rng.uniform() < 0.2:
        hu, labels = _reconstruction_circle(hu, labels)
    return Volume(kind, hu, labels, spec.pixel_spacing_mm, spec.slice_thickness_mm)


def _reconstruction_circle(hu: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blank the corners outside the reconstructed circle, as many scanners store them."""
    rows, columns = hu.shape[1:]
    yy, xx = np.ogrid[:rows, :columns]
    outside = (yy - rows / 2 + 0.5) ** 2 + (xx - columns / 2 + 0.5) ** 2 > (min(rows, columns) / 2) ** 2
    hu, labels = hu.copy(), labels.copy()
    hu[:, outside] = -3024.0
    labels[:, outside] = 0
    return hu, labels


# ---------------------------------------------------------------------------- heads


def head_volume(rng: np.random.Generator, slices: int) -> Volume:
    """A head: skull, brain, orbits, sinus and mastoid air, maybe a frame; no lungs.

    One in five is a dry skull as QA phantoms are: bone in air, air inside, all of it
    body (everything within the outline, as the classical pipeline has it).
    """
    matrix, spacing = _matrix_and_spacing(rng, (220.0, 320.0))
    y = (np.arange(matrix) - matrix / 2 + 0.5) * spacing - rng.uniform(-15.0, 15.0)
    x = (np.arange(matrix) - matrix / 2 + 0.5) * spacing - rng.uniform(-10.0, 10.0)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    ap, lr = rng.uniform(80.0, 100.0), rng.uniform(65.0, 80.0)
    skull = rng.uniform(4.0, 8.0)
    frame = rng.uniform() < 0.5
    holder = rng.uniform() < 0.6
    cushion_hu = float(rng.uniform(-960.0, -750.0))
    dry = rng.uniform() < 0.2
    hu = np.full((slices, matrix, matrix), AIR_HU, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    for k in range(slices):
        t = k / max(slices - 1, 1)  # 0 vertex, 1 skull base
        size = math.sqrt(max(0.05, 1.0 - (1.0 - t) ** 2 * 0.8))
        _draw_head_slice(hu[k], labels[k], yy, xx, ap * size, lr * size, skull, t, rng, dry)
        if frame:
            _draw_frame(hu[k], yy, xx, ap, lr)
        if holder:
            _draw_holder(hu[k], yy, xx, ap * size, lr * size, ap, lr, cushion_hu)
    hu += rng.normal(0.0, rng.uniform(3.0, 25.0), hu.shape).astype(np.float32)
    return Volume("head", hu, labels, spacing, float(rng.choice([1.0, 2.5, 5.0])))


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sy: float, sx: float) -> np.ndarray:
    return ((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2 <= 1.0


def _draw_head_slice(
    sl: np.ndarray, lab: np.ndarray, yy: np.ndarray, xx: np.ndarray, ap: float, lr: float,
    skull: float, t: float, rng: np.random.Generator, dry: bool,
) -> None:
    head = _ellipse(yy, xx, 0.0, 0.0, ap, lr)
    sl[head] = SOFT_TISSUE_HU
    lab[head] = 1
    scalp = 0.0 if dry else 3.0
    sl[_ellipse(yy, xx, 0.0, 0.0, ap - scalp, lr - scalp)] = float(rng.uniform(700.0, 1400.0))
    inside = AIR_HU if dry else float(rng.uniform(25.0, 40.0))
    sl[_ellipse(yy, xx, 0.0, 0.0, ap - scalp - skull, lr - scalp - skull)] = inside
    if t < 0.6:
        return
    # Skull base: orbits in front, sinuses between, mastoid air cells behind the ears.
    for side in (-1, 1):
        sl[_ellipse(yy, xx, -ap * 0.7, side * lr * 0.4, 14.0, 13.0)] = FAT_HU
        sl[_ellipse(yy, xx, -ap * 0.7, side * lr * 0.4, 10.0, 10.0)] = 15.0
        for _ in range(int(rng.integers(3, 12))):
            cy, cx = ap * rng.uniform(0.1, 0.3), side * lr * rng.uniform(0.6, 0.85)
            sl[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1.0, 4.0) ** 2] = AIR_HU
    sinus = _ellipse(yy, xx, -ap * 0.55, 0.0, rng.uniform(8.0, 18.0), rng.uniform(6.0, 20.0))
    sl[sinus] = AIR_HU
    sl[sinus & (np.abs(xx) < 1.0)] = BONE_HU  # septum


def _draw_frame(sl: np.ndarray, yy: np.ndarray, xx: np.ndarray, ap: float, lr: float) -> None:
    """A stereotactic frame: posts and a ring around the head, not part of the body."""
    for angle in (45.0, 135.0, 225.0, 315.0):
        a = math.radians(angle)
        cy, cx = (ap + 25.0) * math.sin(a), (lr + 25.0) * math.cos(a)
        sl[(np.abs(yy - cy) <= 5.0) & (np.abs(xx - cx) <= 5.0)] = 1200.0
    ring = _ellipse(yy, xx, 0.0, 0.0, ap + 45.0, lr + 45.0) & ~_ellipse(yy, xx, 0.0, 0.0, ap + 41.0, lr + 41.0)
    sl[ring] = TABLE_HU


def _draw_holder(
    sl: np.ndarray, yy: np.ndarray, xx: np.ndarray, ap: float, lr: float,
    full_ap: float, full_lr: float, cushion_hu: float,
) -> None:
    """A U-shaped head holder behind the head with a foam cushion in it (background)."""
    outer = _ellipse(yy, xx, 5.0, 0.0, full_ap + 30.0, full_lr + 30.0) & (yy > -10.0)
    inner = _ellipse(yy, xx, 5.0, 0.0, full_ap + 26.0, full_lr + 26.0)
    sl[outer & ~inner] = TABLE_HU
    head = _ellipse(yy, xx, 0.0, 0.0, ap, lr)
    cushion = inner & (yy > ap * 0.3) & ~head
    # Foam: textured like parenchyma, which is why the model must learn it is not lung.
    sl[cushion] = cushion_hu + 40.0 * np.sin(xx[cushion] * 0.9) * np.sin(yy[cushion] * 1.1)


# ------------------------------------------------------------------- on the grid


def _augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, grid: GridSpec) -> None:
    """In place: a small roll of the patient, correlated noise, a grey-level shift."""
    size = grid.size
    for k in range(x.shape[0]):
        angle = float(rng.uniform(-10.0, 10.0))
        if abs(angle) > 1.0:
            rot = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle, 1.0)
            x[k] = cv2.warpAffine(x[k], rot, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
            y[k] = cv2.warpAffine(y[k], rot, (size, size), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    width = grid.hu_window[1] - grid.hu_window[0]
    noise = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    for k in range(x.shape[0]):
        noise[k] = cv2.GaussianBlur(noise[k], (0, 0), 0.8) * (rng.uniform(0.0, 25.0) / 0.35 / width)
    x += noise + (rng.uniform(-15.0, 15.0, (x.shape[0], 1, 1)) / width).astype(np.float32)
    np.clip(x, 0.0, 1.0, out=x)


def volume_slices(volume: Volume, grid: GridSpec) -> SliceSet:
    """A volume (already in standard orientation) on the model grid, not augmented."""
    spacing = (volume.pixel_spacing_mm, volume.pixel_spacing_mm)
    place = slice_grid.placement(volume.hu.shape[1:], spacing, grid)
    x = slice_grid.to_model_grid(volume.hu, place, grid)
    y = slice_grid.to_model_grid(volume.labels, place, grid, labels=True)
    return SliceSet(x, y)


def generate_volume(kind: str, rng: np.random.Generator, slices: int) -> Volume:
    if kind == "head":
        return head_volume(rng, slices)
    return trunk_volume(kind, rng, slices)


def synthetic_set(
    seed: int, volumes: int, grid: GridSpec, *, slices: int = 8, augment: bool = True
) -> tuple[SliceSet, dict[str, int]]:
    """Slices of ``volumes`` generated volumes; the same arguments give the same slices.

    Returns
    -------
    slices
        All slices of all volumes, float16 input and uint8 targets on the grid.
    counts
        Volumes generated per kind.
    """
    parts, counts = [], dict.fromkeys(KINDS, 0)
    for index in range(volumes):
        rng = np.random.default_rng([seed, 1, index])
        kind = _pick_kind(rng)
        counts[kind] += 1
        part = volume_slices(generate_volume(kind, rng, slices), grid)
        if augment:
            _augment(part.x, part.y, rng, grid)
        parts.append(SliceSet(part.x.astype(np.float16), part.y))
    return SliceSet.concatenate(parts, grid.size), counts


# ------------------------------------------------------------------------ real CT


def real_slices(folders: Sequence[Path], grid: GridSpec, *, labels: str = "reference",
                corrections: Mapping[str, Corrections] | None = None,
                ) -> tuple[SliceSet, list[dict[str, object]]]:
    """Slices of real CT series with their labels.

    Every readable CT image series under each folder is used; what is skipped (not
    an image, not a regular volume, not axial) is listed in the returned records.

    Parameters
    ----------
    labels
        ``"reference"``: the lungs by the reference procedure (:mod:`analysis.reference`,
        the masks ``pacsnode reference`` saves as SEG), then the series' hand-checked
        corrections if ``corrections`` has them, the body by the same procedure;
        ``"classical"``: body and lungs by the classical ``ct-body-lungs`` pipeline.
    corrections
        Series Instance UID -> corrections (``analysis/reference_corrections``, loaded by
        ``analysis.corrections.load_corrections``).
    """
    import pydicom

    from analysis.volume import VolumeError, volume_from_datasets

    if labels not in REAL_LABELS:
        raise ValueError(f"labels must be one of {', '.join(REAL_LABELS)}, got {labels!r}")
    parts, records = [], []
    for folder in folders:
        series: dict[str, list[pydicom.Dataset]] = {}
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - not DICOM: skipped like a stray file
                continue
            if "PixelData" in ds and getattr(ds, "Modality", "") == "CT":
                series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        for uid, datasets in series.items():
            record: dict[str, object] = {"folder": str(folder), "series": uid, "slices": 0,
                                         "labels": labels}
            try:
                volume, _ = volume_from_datasets(datasets)
                orientation = slice_grid.orientation_of(volume.affine)
            except (VolumeError, slice_grid.NotAxialError) as error:
                record["skipped"] = str(error)
                records.append(record)
                continue
            fixes = (corrections or {}).get(uid)
            if labels == "reference":
                record["corrections"] = _shown(fixes.source) if fixes else None
            lab = _real_labels(volume, labels, fixes)
            spacing = slice_grid.standard_spacing(volume.spacing_mm[1:], orientation)
            hu = slice_grid.to_standard(volume.hu, orientation)
            lab = slice_grid.to_standard(lab, orientation)
            place = slice_grid.placement(hu.shape[1:], spacing, grid)
            x = slice_grid.to_model_grid(hu, place, grid).astype(np.float16)
            parts.append(SliceSet(x, slice_grid.to_model_grid(lab, place, grid, labels=True)))
            record["slices"] = int(hu.shape[0])
            records.append(record)
    return SliceSet.concatenate(parts, grid.size), records


def _shown(source: str) -> str:
    """A corrections file as a card records it: relative to the project when inside it
    (the same on every checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(source).resolve().relative_to(root))
    except ValueError:
        return source


def _real_labels(volume: Any, labels: str, fixes: Corrections | None) -> np.ndarray:
    """Class indices (0 background, 1 body, 2 left lung, 3 right lung) of a real volume."""
    from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT

    if labels == "classical":
        masks = _classical_pipeline().run(volume).masks
        body, left, right = masks[BODY], masks[LUNG_LEFT], masks[LUNG_RIGHT]
    else:
        from analysis.corrections import apply_corrections
        from analysis.reference import reference_lungs

        found = reference_lungs(volume.hu, volume.spacing_mm, volume.affine)
        lungs = {LUNG_LEFT: found.left, LUNG_RIGHT: found.right}
        if fixes is not None:
            lungs = apply_corrections(lungs, fixes)
        left, right = lungs[LUNG_LEFT], lungs[LUNG_RIGHT]
        # The trachea and main bronchi the procedure removed are body, not lung.
        body = found.body | left | right
    out = np.zeros(volume.hu.shape, dtype=np.uint8)
    out[body] = 1
    out[left] = 2
    out[right] = 3
    return out


def _classical_pipeline() -> Any:
    """The classical body-and-lungs pipeline (``ct-body-lungs`` may combine it with a CNN)."""
    from analysis.pipeline import UnknownPipeline, get_pipeline

    try:
        return get_pipeline("ct-body-lungs-classical")
    except UnknownPipeline:
        return get_pipeline("ct-body-lungs")
