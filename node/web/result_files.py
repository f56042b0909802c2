"""A job's result files as the study page shows them: the measurements table read back
from its SR (the file the PACS got, so the page shows what the radiologist sees), and
the paths of the SEG, SR and preview for download."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from db.tables import Job, Result, Study
from node.audit_queries import read_session

log = logging.getLogger(__name__)

# (code value, derivation code value or None) -> column of the measurements table;
# the codes node/results/sr.py writes.
_COLUMNS = {
    ("118565006", None): "volume_ml",
    ("112031", "373098007"): "mean_hu",
    ("112031", "386136009"): "std_hu",
    ("C0JK", None): "surface_area_mm2",
    ("81827009", "56851009"): "max_diameter_mm",
    ("DICECNNCLASSIC", None): "dice_vs_classical",
}
_REGIONS = {"69536005": "head", "816094009": "chest", "818981001": "abdomen",
            "816092008": "pelvis"}


def result_file(engine: Engine, data_dir: Path, study_uid: str, result_id: int,
                ) -> tuple[Path, str] | None:
    """The file of one result of a study and its kind, or ``None`` (never outside
    ``data_dir``)."""
    with read_session(engine) as conn:
        row = conn.execute(
            select(Result.file_path, Result.kind).join(Job, Job.id == Result.job_fk)
            .join(Study, Study.id == Job.study_fk)
            .where(Study.study_instance_uid == study_uid, Result.id == result_id)).first()
    if row is None:
        return None
    root = data_dir.resolve()
    path = (root / row.file_path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path, row.kind


def result_ids(engine: Engine, study_uid: str) -> dict[str, int]:
    """SOP Instance UID (or ``job-N/preview``) -> result id, for the study's results."""
    with read_session(engine) as conn:
        rows = conn.execute(
            select(Result.id, Result.sop_instance_uid, Result.job_fk, Result.kind)
            .join(Job, Job.id == Result.job_fk).join(Study, Study.id == Job.study_fk)
            .where(Study.study_instance_uid == study_uid)).all()
    return {r.sop_instance_uid or f"job-{r.job_fk}/{r.kind}": int(r.id) for r in rows}


def measurements(sr_path: Path) -> dict[str, Any]:
    """The SR's measurements per structure and its predicted region.

    Returns ``{"structures": [{"label", "volume_ml", "mean_hu", "std_hu",
    "surface_area_mm2", "max_diameter_mm", "dice_vs_classical"}], "region":
    {"label", "probability"} or None}``; empty when the file cannot be read.
    """
    import highdicom as hd

    try:
        sr = hd.sr.srread(sr_path)
        groups = sr.content.get_volumetric_roi_measurement_groups()
    except Exception as exc:  # a damaged file is shown as such, not as a 500
        log.warning("cannot read the measurements of %s: %s", sr_path, exc)
        return {"structures": [], "region": None, "error": f"cannot read the SR: {exc}"}
    structures = []
    for group in groups:
        row: dict[str, Any] = {"label": group.tracking_identifier}
        for item in group.get_measurements():
            derivation = item.derivation.value if item.derivation is not None else None
            column = _COLUMNS.get((item.name.value, derivation))
            if column:
                row[column] = round(float(item.value), 3)
        structures.append(row)
    return {"structures": structures, "region": _region(sr, hd)}


def _region(sr: Any, hd: Any) -> dict[str, Any] | None:
    from node.results.sr import PROBABILITY, TARGET_REGION

    found = hd.sr.utils.find_content_items(sr, name=TARGET_REGION, recursive=True)
    if not found:
        return None
    code = found[0].ConceptCodeSequence[0]
    probability = hd.sr.utils.find_content_items(sr, name=PROBABILITY, recursive=True)
    return {"label": _REGIONS.get(str(code.CodeValue), str(code.CodeMeaning).lower()),
            "probability": float(probability[0].MeasuredValueSequence[0].NumericValue)
            if probability else None}
