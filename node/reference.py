"""``pacsnode reference``: reference lung masks per series, corrected by hand, as DICOM SEG.

The masks come from :func:`analysis.reference.reference_lungs`; a person then looks at
overlays and writes the corrections as data (``analysis/reference_corrections/*.json``,
schema ``pacsnode.reference-corrections/1``)::

    {"schema": "pacsnode.reference-corrections/1",
     "name": "LIDC-IDRI-0314", "series_instance_uid": "1.3.6...", "lung": true,
     "corrections": [
       {"action": "erase", "slices": [0, 5], "rows": [100, 200], "columns": [200, 300],
        "labels": ["lung_left", "lung_right"]},
       {"action": "drop", "slice": 40, "row": 250, "column": 260},
       {"action": "relabel", "slice": 40, "row": 250, "column": 260, "to": "lung_left"}],
     "checked": "what was looked at, by whom, and what was seen"}

Slice indices are those of the volume in spatial order (as ``analysis.volume`` sorts
it, and as the overlay PNGs are numbered); ranges are [first, stop) like Python's.
``"lung": false`` states that the series has no lung: no SEG is written for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from analysis.reference import (  # noqa: F401  (the corrections' types are this module's API too)
    LABELS,
    Correction,
    Corrections,
    CorrectionsError,
    apply_corrections,
)
from analysis.types import LUNG_LEFT, LUNG_RIGHT

SCHEMA = "pacsnode.reference-corrections/1"
SERIES_DESCRIPTION = "Reference lungs (threshold + corrections)"
SERIES_NUMBER = 9950
_ACTIONS = ("erase", "drop", "relabel")


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise CorrectionsError(f"{where}{key}: required")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CorrectionsError(f"{where}{key}: must be {names}, got {type(value).__name__}")
    return value


def _range(data: Mapping[str, Any], key: str, where: str) -> tuple[int, int]:
    value = _field(data, key, list, where)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
            or not 0 <= value[0] < value[1]:
        raise CorrectionsError(f"{where}{key}: must be [first, stop) with 0 <= first < stop, "
                               f"got {value!r}")
    return int(value[0]), int(value[1])


def _label(value: Any, where: str) -> str:
    if value not in LABELS:
        raise CorrectionsError(f"{where}: must be one of {', '.join(LABELS)}, got {value!r}")
    return str(value)


def _correction(data: Any, where: str) -> Correction:
    if not isinstance(data, dict):
        raise CorrectionsError(f"{where}: must be an object")
    action = _field(data, "action", str, where + ".")
    if action not in _ACTIONS:
        raise CorrectionsError(f"{where}.action: must be one of {', '.join(_ACTIONS)}, "
                               f"got {action!r}")
    if action == "erase":
        labels = data.get("labels", list(LABELS))
        if not isinstance(labels, list) or not labels:
            raise CorrectionsError(f"{where}.labels: must be a non-empty list")
        return Correction(action, slices=_range(data, "slices", where + "."),
                          rows=_range(data, "rows", where + "."),
                          columns=_range(data, "columns", where + "."),
                          labels=tuple(_label(v, f"{where}.labels[{i}]")
                                       for i, v in enumerate(labels)))
    point = tuple(int(_field(data, key, int, where + ".")) for key in ("slice", "row", "column"))
    if min(point) < 0:
        raise CorrectionsError(f"{where}: slice, row and column must be >= 0")
    to = _label(data.get("to"), f"{where}.to") if action == "relabel" else ""
    return Correction(action, point=point, to=to)  # type: ignore[arg-type]


def parse_corrections(data: Any, source: str = "") -> Corrections:
    """Validate a corrections document; errors name the field."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise CorrectionsError(f"{where}must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise CorrectionsError(f"{where}schema: must be {SCHEMA!r}, got {data.get('schema')!r}")
    known = {"schema", "name", "series_instance_uid", "lung", "corrections", "checked"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CorrectionsError(f"{where}{unknown[0]}: unknown field")
    uid = _field(data, "series_instance_uid", str, where)
    if not uid.strip():
        raise CorrectionsError(f"{where}series_instance_uid: must be a non-empty string")
    checked = _field(data, "checked", str, where)
    if not checked.strip():
        raise CorrectionsError(f"{where}checked: must say what was checked by eye")
    items = data.get("corrections", [])
    if not isinstance(items, list):
        raise CorrectionsError(f"{where}corrections: must be a list")
    lung = _field(data, "lung", bool, where)
    if not lung and items:
        raise CorrectionsError(f"{where}corrections: must be empty when lung is false")
    return Corrections(
        name=str(data.get("name", "")), series_instance_uid=uid, lung=lung,
        corrections=tuple(_correction(c, f"{where}corrections[{i}]") for i, c in enumerate(items)),
        checked=checked, source=source)


def load_corrections(path: Path) -> dict[str, Corrections]:
    """One file or every ``*.json`` in a folder -> Series Instance UID -> corrections."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    found: dict[str, Corrections] = {}
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CorrectionsError(f"{file}: cannot read JSON: {exc}") from None
        item = parse_corrections(data, str(file))
        if item.series_instance_uid in found:
            raise CorrectionsError(f"{file}: series_instance_uid: also in "
                                   f"{found[item.series_instance_uid].source}")
        found[item.series_instance_uid] = item
    return found


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
