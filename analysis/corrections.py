"""Hand-checked corrections of the reference lungs: read, validated and applied.

A person looks at the overlays of :func:`analysis.reference.reference_lungs` and writes
what to fix as data (``analysis/reference_corrections/*.json``, schema
``pacsnode.reference-corrections/1``)::

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
``"lung": false`` states that the series has no lung. Plain JSON and numpy: both
``pacsnode reference`` / ``pacsnode train`` and ``python -m analysis.training.lungs``
read the files through :func:`load_corrections`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from analysis.types import LUNG_LEFT, LUNG_RIGHT

CORRECTIONS_DIR = Path(__file__).resolve().parent / "reference_corrections"
LABELS = (LUNG_LEFT, LUNG_RIGHT)
SCHEMA = "pacsnode.reference-corrections/1"
_ACTIONS = ("erase", "drop", "relabel")


class CorrectionsError(ValueError):
    """A corrections file that does not follow the schema; the message names the field."""


@dataclass(frozen=True)
class Correction:
    """One stated correction (see the module docstring)."""

    action: str
    slices: tuple[int, int] = (0, 0)
    rows: tuple[int, int] = (0, 0)
    columns: tuple[int, int] = (0, 0)
    labels: tuple[str, ...] = LABELS
    point: tuple[int, int, int] = (0, 0, 0)
    to: str = ""


@dataclass(frozen=True)
class Corrections:
    """A series' hand-checked corrections."""

    name: str
    series_instance_uid: str
    lung: bool
    corrections: tuple[Correction, ...] = ()
    checked: str = ""
    source: str = ""


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


def training_corrections(path: Path | None) -> dict[str, Corrections]:
    """The corrections a training run applies: those under ``path``, or the shipped
    folder's when ``path`` is None (none if a checkout has no such folder)."""
    if path is None:
        return load_corrections(CORRECTIONS_DIR) if CORRECTIONS_DIR.is_dir() else {}
    if not path.exists():
        raise CorrectionsError(f"{path}: no such file or folder")
    return load_corrections(path)


def apply_corrections(masks: Mapping[str, np.ndarray], corrections: Corrections
                      ) -> dict[str, np.ndarray]:
    """The masks after the stated corrections, in order; errors name the correction."""
    out = {label: masks[label].copy() for label in LABELS}
    shape = out[LUNG_LEFT].shape
    if not corrections.lung:
        return {label: np.zeros(shape, dtype=bool) for label in LABELS}
    for index, item in enumerate(corrections.corrections):
        where = f"{corrections.source}: corrections[{index}]"
        if item.action == "erase":
            box = tuple(slice(a, b) for a, b in (item.slices, item.rows, item.columns))
            for axis, (a, _) in enumerate((item.slices, item.rows, item.columns)):
                if a >= shape[axis]:
                    raise CorrectionsError(f"{where}: starts beyond the volume {shape}")
            for label in item.labels:
                out[label][box] = False
            continue
        if any(p >= n for p, n in zip(item.point, shape, strict=True)):
            raise CorrectionsError(f"{where}: point {item.point} outside the volume {shape}")
        owner = [label for label in LABELS if out[label][item.point]]
        if not owner:
            raise CorrectionsError(f"{where}: point {item.point} is in neither lung")
        pieces, _ = ndimage.label(out[owner[0]], structure=ndimage.generate_binary_structure(3, 1))
        piece = pieces == pieces[item.point]
        out[owner[0]] &= ~piece
        if item.action == "relabel":
            out[item.to] |= piece
    return out
