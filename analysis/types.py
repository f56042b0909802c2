"""The data that flows between analysis steps and out of a pipeline.

Numpy only: the node turns these into DICOM (``node/results.py``); analysis never sees
a dataset, a socket or a database row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Segment labels a pipeline may produce, in the order results list them. The node
#: maps each to its SNOMED CT coded category and type (``node/results.py``).
BODY = "body"
LUNG_LEFT = "lung_left"
LUNG_RIGHT = "lung_right"

#: Which segmenter provides each final mask of ``ct-body-lungs`` unless configured
#: otherwise: the one that measured better on the evaluation set (docs/models.md).
DEFAULT_FINAL_MASK: dict[str, str] = {BODY: "classical", LUNG_LEFT: "cnn", LUNG_RIGHT: "cnn"}


@dataclass(frozen=True)
class ImageVolume:
    """A CT volume in Hounsfield units on a regular grid.

    Attributes
    ----------
    hu
        float32 array ``(slices, rows, columns)``: axis 0 runs along the slice normal,
        axes 1 and 2 are the image rows and columns of the source frames.
    spacing_mm
        Voxel spacing ``(between slices, between rows, between columns)`` in mm.
    affine
        4x4 matrix mapping ``(slice, row, column, 1)`` indices to patient (LPS)
        coordinates in mm; a step uses it to tell the patient's left from right.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"hu must be 3D (slices, rows, columns), got shape {self.hu.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be three positive values, got {self.spacing_mm}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {self.affine.shape}")

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0


@dataclass(frozen=True)
class SegmentMeasurement:
    """What is measured for one segment."""

    label: str
    voxels: int
    volume_ml: float
    mean_hu: float
    std_hu: float
    surface_area_mm2: float
    max_diameter_mm: float


@dataclass
class PipelineResult:
    """The output of one pipeline run on one volume.

    ``masks`` maps segment label -> bool array of ``ImageVolume.hu``'s shape, in the
    order the segments are to be encoded; a structure that was looked for and not
    found is present with an all-False mask. ``timings_s`` gives each step's wall time.
    """

    pipeline: str
    masks: dict[str, np.ndarray]
    measurements: list[SegmentMeasurement]
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Per label, the Dice agreement between the CNN's and the classical mask (QA).
    agreement: dict[str, float] = field(default_factory=dict)
    #: Per label, which segmenter provided the final mask ("cnn" or "classical").
    mask_sources: dict[str, str] = field(default_factory=dict)
    #: Per segmenter, its masks before the choice (for evaluation).
    candidates: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
