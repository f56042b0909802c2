"""A preview image of a pipeline's masks: axial slices in lung window with coloured overlays.

The node stores it beside the results for a human to glance at; it is not a DICOM
object. Slices are shown in radiological convention (patient's right on the image's
left, anterior at the top) whatever the source orientation, so a left/right swap is
visible at a glance.
"""

from __future__ import annotations

import cv2
import numpy as np

from analysis.intensity import to_uint8
from analysis.types import BODY, LUNG_LEFT, LUNG_RIGHT, ImageVolume

#: RGB per label; other labels take colours from ``_FALLBACK_COLOURS`` in turn.
COLOURS: dict[str, tuple[int, int, int]] = {
    BODY: (60, 200, 90),
    LUNG_RIGHT: (235, 70, 60),
    LUNG_LEFT: (50, 130, 255),
}
_FALLBACK_COLOURS = [(240, 200, 40), (200, 80, 220), (40, 210, 210)]
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width
_FILL_ALPHA = 0.35
_TILE_PX = 384
_GAP_PX = 4


def render_overlay(
    volume: ImageVolume,
    masks: dict[str, np.ndarray],
    *,
    window: tuple[float, float] = LUNG_WINDOW,
    tiles: int = 4,
) -> np.ndarray:
    """Render the most informative axial slices with translucent, outlined masks.

    Parameters
    ----------
    volume
        The analysed volume.
    masks
        label -> bool mask of ``volume.hu``'s shape. The body is drawn as an outline
        only, other labels filled translucently and outlined.
    window
        (centre, width) in HU for the grey values.
    tiles
        4 gives a 2x2 montage (the slice with the most lung, then others spread over
        the masks' extent) when the volume has that many slices; 1 gives one slice.

    Returns
    -------
    numpy.ndarray
        RGB uint8 ``(height, width, 3)``; convert with ``cv2.COLOR_RGB2BGR`` before
        ``cv2.imwrite``.
    """
    for label, mask in masks.items():
        if mask.shape != volume.hu.shape:
            raise ValueError(f"mask {label!r} has shape {mask.shape}, the volume {volume.hu.shape}")
    indices = _pick_slices(volume.hu.shape[0], masks, tiles)
    images = [_render_slice(volume, masks, k, window) for k in indices]
    return _montage(images) if len(images) > 1 else images[0]


def _pick_slices(slices: int, masks: dict[str, np.ndarray], tiles: int) -> list[int]:
    lungs = [m for label, m in masks.items() if label.startswith("lung")]
    chosen = lungs if any(m.any() for m in lungs) else list(masks.values())
    area = sum((m.sum(axis=(1, 2)) for m in chosen), np.zeros(slices, dtype=np.int64))
    best = int(np.argmax(area)) if np.any(area) else slices // 2
    if tiles <= 1 or slices < tiles:
        return [best]
    present = np.flatnonzero(area) if np.any(area) else np.arange(slices)
    spread = np.quantile(present, np.linspace(0.15, 0.85, tiles - 1)).round().astype(int)
    others = [int(k) for k in dict.fromkeys(spread.tolist()) if k != best]
    for k in range(slices):  # short masks: top up with any other slice
        if len(others) >= tiles - 1:
            break
        if k != best and k not in others:
            others.append(k)
    return [best, *sorted(others[: tiles - 1])]


def _display_axes(affine: np.ndarray) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) for patient +x rightwards, +y downwards."""
    transpose = abs(affine[0, 1]) > abs(affine[0, 2])
    column_axis, row_axis = (1, 2) if transpose else (2, 1)
    return transpose, bool(affine[1, row_axis] < 0), bool(affine[0, column_axis] < 0)


def _oriented(image: np.ndarray, axes: tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_columns = axes
    out = image.T if transpose else image
    if flip_rows:
        out = out[::-1]
    if flip_columns:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _tile_size(volume: ImageVolume, transpose: bool, shape: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with square pixels in mm, longest side ``_TILE_PX``."""
    row_mm, column_mm = volume.spacing_mm[1], volume.spacing_mm[2]
    if transpose:
        row_mm, column_mm = column_mm, row_mm
    height_mm, width_mm = shape[0] * row_mm, shape[1] * column_mm
    scale = _TILE_PX / max(height_mm, width_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _render_slice(
    volume: ImageVolume, masks: dict[str, np.ndarray], k: int, window: tuple[float, float]
) -> np.ndarray:
    axes = _display_axes(volume.affine)
    grey = _oriented(to_uint8(volume.hu[k], *window), axes)
    size = _tile_size(volume, axes[0], grey.shape)
    image = cv2.cvtColor(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
    fallback = iter(_FALLBACK_COLOURS * (1 + len(masks)))
    for label, mask in masks.items():
        colour = COLOURS.get(label) or next(fallback)
        section = _oriented(mask[k].view(np.uint8), axes)
        section = cv2.resize(section, size, interpolation=cv2.INTER_NEAREST)
        _draw_mask(image, section, colour, fill=label != BODY)
    middle = size[1] // 2
    for text, origin in ((f"{k}", (6, 18)), ("R", (6, middle)), ("L", (size[0] - 16, middle))):
        cv2.putText(
            image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA
        )
    return image


def _draw_mask(
    image: np.ndarray, section: np.ndarray, colour: tuple[int, int, int], *, fill: bool
) -> None:
    if not section.any():
        return
    if fill:
        inside = section > 0
        tint = np.array(colour, dtype=np.float32)
        image[inside] = (image[inside] * (1.0 - _FILL_ALPHA) + tint * _FILL_ALPHA).astype(np.uint8)
    contours, _ = cv2.findContours(section, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # Aliased lines keep the label's exact colour on the outline.
    cv2.drawContours(image, contours, -1, colour, 1, cv2.LINE_8)


def _montage(images: list[np.ndarray]) -> np.ndarray:
    """Two columns, as many rows as needed, tiles centred in equal cells."""
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    rows = (len(images) + 1) // 2
    out = np.zeros((rows * height + (rows - 1) * _GAP_PX, 2 * width + _GAP_PX, 3), dtype=np.uint8)
    for n, tile in enumerate(images):
        top = (n // 2) * (height + _GAP_PX) + (height - tile.shape[0]) // 2
        left = (n % 2) * (width + _GAP_PX) + (width - tile.shape[1]) // 2
        out[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return out
