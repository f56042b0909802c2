"""``pacsnode reference``: reference lung masks per series, corrected by hand, as DICOM SEG.

The masks come from :func:`analysis.reference.reference_lungs`; a person then looks at
overlays and writes the corrections as data (``analysis/reference_corrections/*.json``;
the schema, its validation and how each correction applies are in
:mod:`analysis.corrections`). A series whose corrections say ``"lung": false`` gets no SEG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

from analysis.corrections import Corrections, apply_corrections
from analysis.types import LUNG_LEFT, LUNG_RIGHT

SERIES_DESCRIPTION = "Reference lungs (threshold + corrections)"
SERIES_NUMBER = 9950


@dataclass
class ReferenceOutcome:
    """What ``pacsnode reference`` did with one series."""

    series_instance_uid: str
    status: str  # written, no-lung, failed
    reason: str = ""
    seg: Dataset | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def reference_for_series(datasets: Sequence[Dataset], corrections: Corrections | None
                         ) -> ReferenceOutcome:
    """Reference lungs of one image series (the procedure, then the corrections)."""
    from analysis.reference import reference_lungs
    from node.workflow.analyze import AnalysisRefused, load_series

    uid = str(datasets[0].SeriesInstanceUID)
    try:
        loaded = load_series(datasets, {})
    except AnalysisRefused as exc:
        return ReferenceOutcome(uid, "failed", str(exc))
    if len(loaded.blocks) > 1:
        return ReferenceOutcome(uid, "failed", "slice spacing varies: not supported here")
    volume = loaded.volume
    found = reference_lungs(volume.hu, volume.spacing_mm, volume.affine)
    masks = apply_corrections({LUNG_LEFT: found.left, LUNG_RIGHT: found.right},
                              corrections or Corrections("", uid, True, source="(none)"))
    ml = {k: round(float(m.sum()) * volume.voxel_volume_ml, 2) for k, m in masks.items()}
    outcome = ReferenceOutcome(uid, "written", volumes_ml=ml, notes=found.notes, masks=masks)
    if not any(m.any() for m in masks.values()):
        outcome.status = "no-lung"
        outcome.reason = ("the corrections state no lung" if corrections and not corrections.lung
                          else "the procedure found no lung")
        return outcome
    outcome.seg = _encode([loaded.images[i] for i in loaded.order], masks, corrections)
    return outcome


def _encode(sources: list[Dataset], masks: Mapping[str, np.ndarray],
            corrections: Corrections | None) -> Dataset:
    from node import __version__, results

    stated = len(corrections.corrections) if corrections else 0
    algorithm = results.AlgorithmInfo(
        name="pacsnode reference lungs", version=__version__,
        family=results.AlgorithmFamily.HISTOGRAM_ANALYSIS,
        parameters={"corrections": str(stated)})
    prepared = results.prepare_sources(sources, one_frame_of_reference=True)
    return results.build_segmentation(
        prepared, dict(masks), algorithm=algorithm,
        identity=results.EncoderIdentity.for_node("PACSNODE"),
        series_number=SERIES_NUMBER, series_description=SERIES_DESCRIPTION)
