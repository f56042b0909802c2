"""Encode pipeline results as DICOM: a Segmentation and a TID 1500 Measurement Report.

The analysis side hands over numpy masks and :class:`analysis.types.SegmentMeasurement`
values; this package turns them into a BINARY DICOM Segmentation (one segment per
non-empty mask, :mod:`~node.results.seg`) and a Comprehensive 3D SR that references
each segment (:mod:`~node.results.sr`), both in the study of the source images, in new
series, with the node as the creating device (:mod:`~node.results.identity`).

Everything DICOM is delegated to highdicom, which writes the modules, functional groups
and content tree; this package only decides the coded concepts
(:mod:`~node.results.structures`), checks its inputs and makes real-world source
headers acceptable to highdicom (:mod:`~node.results.sources`).

A new result type gets its own module here beside ``seg`` and ``sr``.
"""

from node.results.identity import (
    MANUFACTURER,
    MODEL_NAME,
    AlgorithmFamily,
    AlgorithmInfo,
    EncoderIdentity,
)
from node.results.seg import build_segmentation
from node.results.sources import prepare_sources
from node.results.sr import REGION_CODES, RegionFinding, build_measurement_report
from node.results.structures import (
    DEFAULT_STRUCTURES,
    STRUCTURES,
    Structure,
    StructureCatalog,
    UnknownStructureError,
)

__all__ = [
    "DEFAULT_STRUCTURES",
    "MANUFACTURER",
    "MODEL_NAME",
    "REGION_CODES",
    "STRUCTURES",
    "AlgorithmFamily",
    "AlgorithmInfo",
    "EncoderIdentity",
    "RegionFinding",
    "Structure",
    "StructureCatalog",
    "UnknownStructureError",
    "build_measurement_report",
    "build_segmentation",
    "prepare_sources",
]
