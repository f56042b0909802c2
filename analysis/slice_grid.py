"""Axial slices onto a segmentation model's fixed grid and back.

A 2D model sees every slice the same way whatever the scanner wrote: turned to the
standard axial orientation (patient's left on the image's right, anterior at the top),
resampled to a fixed pixel spacing so that anatomy has the same size in pixels whatever
the field of view, centred on a square canvas (padded with air, or cropped), and
windowed to [0, 1]. :func:`from_model_grid` undoes each step for the model's output.
Numpy and OpenCV only: training and inference share these functions, so the model is
trained on exactly what it will be given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Slices whose normal is further than this from the patient's z axis are not axial.
MAX_OBLIQUE_DEG = 45.0


class NotAxialError(ValueError):
    """The volume's slices are not axial (sagittal, coronal or too oblique)."""


@dataclass(frozen=True)
class GridSpec:
    """The model's input grid, as the model card records it.

    Attributes
    ----------
    size
        Rows and columns of the square model input.
    pixel_spacing_mm
        Every slice is resampled to this spacing before being centred on the canvas;
        ``size * pixel_spacing_mm`` is the field of view the model sees.
    hu_window
        (low, high): HU mapped linearly to [0, 1], clipped outside.
    pad_hu
        HU of the canvas around a slice smaller than the field of view.
    """

    size: int = 256
    pixel_spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 600.0)
    pad_hu: float = -1000.0


@dataclass(frozen=True)
class Orientation:
    """How to turn a volume's slices into standard axial orientation.

    ``transpose`` swaps rows and columns first (rows run left-right in the source);
    then rows are flipped so that they run towards the patient's back, and columns so
    that they run towards the patient's left.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False


@dataclass(frozen=True)
class Placement:
    """Where a resampled slice sits on the canvas (the same for all slices of a volume).

    ``scaled`` is the slice's (rows, columns) at the grid's spacing; ``offset`` is the
    canvas position of its first pixel per axis: positive when padded, negative when
    the slice is larger than the canvas and was cropped.
    """

    source: tuple[int, int]
    scaled: tuple[int, int]
    offset: tuple[int, int]


def orientation_of(affine: np.ndarray) -> Orientation:
    """The flips that give standard axial orientation, from the index -> LPS affine.

    Raises
    ------
    NotAxialError
        When the slice normal is more than :data:`MAX_OBLIQUE_DEG` from the z axis
        (gantry tilt up to that is fine).
    """
    affine = np.asarray(affine, dtype=np.float64)
    normal = np.cross(affine[:3, 1], affine[:3, 2])
    length = float(np.linalg.norm(normal))
    if length == 0.0 or abs(normal[2]) / length < math.cos(math.radians(MAX_OBLIQUE_DEG)):
        raise NotAxialError(
            "the slices are not axial (slice normal "
            f"{np.round(normal / max(length, 1e-12), 3).tolist()} in LPS); "
            "the model segments axial CT only"
        )
    transpose = abs(affine[0, 1]) > abs(affine[0, 2])
    column_axis, row_axis = (1, 2) if transpose else (2, 1)
    return Orientation(
        transpose=bool(transpose),
        flip_rows=bool(affine[1, row_axis] < 0),
        flip_columns=bool(affine[0, column_axis] < 0),
    )


def to_standard(slices: np.ndarray, orientation: Orientation) -> np.ndarray:
    """``(n, rows, columns[, ...])`` slices turned to standard orientation (a view)."""
    out = np.swapaxes(slices, 1, 2) if orientation.transpose else slices
    if orientation.flip_rows:
        out = out[:, ::-1]
    if orientation.flip_columns:
        out = out[:, :, ::-1]
    return out


def from_standard(slices: np.ndarray, orientation: Orientation) -> np.ndarray:
    """The inverse of :func:`to_standard` (a view)."""
    out = slices
    if orientation.flip_columns:
        out = out[:, :, ::-1]
    if orientation.flip_rows:
        out = out[:, ::-1]
    return np.swapaxes(out, 1, 2) if orientation.transpose else out


def standard_spacing(spacing_mm: tuple[float, float], orientation: Orientation) -> tuple[float, float]:
    """(row, column) spacing after :func:`to_standard`."""
    return (spacing_mm[1], spacing_mm[0]) if orientation.transpose else spacing_mm


def placement(shape: tuple[int, int], spacing_mm: tuple[float, float], grid: GridSpec) -> Placement:
    """Where slices of ``shape`` (rows, columns) at ``spacing_mm`` land on the canvas."""
    scaled = tuple(
        max(1, int(round(n * s / grid.pixel_spacing_mm))) for n, s in zip(shape, spacing_mm)
    )
    offset = tuple((grid.size - n) // 2 for n in scaled)
    return Placement(source=(int(shape[0]), int(shape[1])), scaled=scaled, offset=offset)  # type: ignore[arg-type]


def _resize(image: np.ndarray, shape: tuple[int, int], interpolation: int | None = None) -> np.ndarray:
    if image.shape[:2] == shape:
        return image
    if interpolation is None:
        shrinking = shape[0] * shape[1] < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)
    # OpenCV drops a trailing channel axis of length 1.
    return resized.reshape(shape + image.shape[2:])


def _windows(place: Placement, size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(canvas window, scaled-slice window) of the part of the slice on the canvas."""
    canvas, source = [], []
    for n, off in zip(place.scaled, place.offset):
        start, stop = max(off, 0), min(off + n, size)
        canvas.append(slice(start, stop))
        source.append(slice(start - off, stop - off))
    return (canvas[0], canvas[1]), (source[0], source[1])


def to_model_grid(
    hu: np.ndarray, place: Placement, grid: GridSpec, *, labels: bool = False
) -> np.ndarray:
    """Standard-oriented ``(n, rows, columns)`` slices onto the model's canvas.

    Parameters
    ----------
    hu
        HU slices (or, with ``labels``, integer label slices) of ``place.source`` shape.
    place
        From :func:`placement`.
    grid
        The model's grid.
    labels
        Resample nearest-neighbour, pad with 0 and do not window (training targets).

    Returns
    -------
    numpy.ndarray
        float32 ``(n, size, size)`` in [0, 1], or uint8 labels.
    """
    canvas_win, source_win = _windows(place, grid.size)
    if labels:
        out = np.zeros((hu.shape[0], grid.size, grid.size), dtype=np.uint8)
        for k in range(hu.shape[0]):
            scaled = _resize(np.ascontiguousarray(hu[k], dtype=np.uint8), place.scaled, cv2.INTER_NEAREST)
            out[k][canvas_win] = scaled[source_win]
        return out
    low, high = grid.hu_window
    out = np.full((hu.shape[0], grid.size, grid.size), grid.pad_hu, dtype=np.float32)
    for k in range(hu.shape[0]):
        scaled = _resize(np.ascontiguousarray(hu[k], dtype=np.float32), place.scaled)
        out[k][canvas_win] = scaled[source_win]
    out -= low
    out *= 1.0 / (high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def from_model_grid(scores: np.ndarray, place: Placement, background: int) -> np.ndarray:
    """Per-class model output back onto the source slices, as class indices.

    Parameters
    ----------
    scores
        ``(n, size, size, classes)`` probabilities (or logits) from the model.
    place
        The placement the input was made with.
    background
        Class index given to source pixels that were cropped off the canvas.

    Returns
    -------
    numpy.ndarray
        uint8 ``(n, *place.source)``: the arg-max class of each source pixel, after
        linear interpolation of the scores (smoother outlines than resizing the
        arg-max itself).
    """
    n, size, _, classes = scores.shape
    canvas_win, source_win = _windows(place, size)
    out = np.empty((n, *place.source), dtype=np.uint8)
    cropped = any(off < 0 for off in place.offset)
    for k in range(n):
        if cropped:
            scaled = np.zeros((*place.scaled, classes), dtype=np.float32)
            scaled[..., background] = 1.0
            scaled[source_win] = scores[k][canvas_win]
        else:
            scaled = np.ascontiguousarray(scores[k][canvas_win])
        out[k] = np.argmax(_resize(scaled, place.source, cv2.INTER_LINEAR), axis=-1)
    return out
