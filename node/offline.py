"""The offline ``pacsnode analyze``: every series under some folders -> SEG, SR and
preview files in an output folder, with a JSON report; no network, no database.

Routing and analysis are the node's own (:mod:`node.workflow.routing`,
:func:`node.workflow.analyze.analyze_series`), so a series gets offline what it would
get from the node.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from node.config import Settings
from node.workflow.analyze import (
    AnalysisRefused,
    SeriesOutcome,
    analyze_series,
    dataset_bytes,
    load_series,
    png_bytes,
    predict_region,
)

if TYPE_CHECKING:
    from analysis.region import RegionPrediction

log = logging.getLogger(__name__)


def read_folder(paths: Iterable[str | Path]) -> tuple[dict[str, list[Dataset]], list[str]]:
    """Datasets grouped by series, and the files that are not DICOM instances."""
    from node.dicom.scu import iter_files

    by_series: dict[str, list[Dataset]] = {}
    unreadable: list[str] = []
    for path in iter_files(paths):
        try:
            ds = pydicom.dcmread(path)
            uid = str(ds.SeriesInstanceUID)
        except Exception as exc:  # any file a user points us at may be anything
            unreadable.append(f"{path}: {exc}")
            continue
        by_series.setdefault(uid, []).append(ds)
    return by_series, unreadable


def _offline_outcome(uid: str, datasets: list[Dataset], settings: Settings,
                     forced_pipeline: str | None) -> SeriesOutcome:
    from node.workflow.routing import choose_route, facts_from_datasets, never_analysed

    facts = facts_from_datasets(uid, datasets)
    timings: dict[str, float] = {}
    loaded, region, route = None, None, None
    pipeline = forced_pipeline
    try:
        if pipeline is not None:
            if reason := never_analysed(facts):
                return SeriesOutcome(uid, "skipped", reason)
        else:
            decision = choose_route(facts, settings.routes)
            if decision.pending:  # the route depends on what the pixels look like
                loaded = load_series(datasets, timings)
                region = predict_region(loaded, timings)
                decision = choose_route(
                    replace(facts, predicted_region=region.label if region else "other"),
                    settings.routes)
            if decision.route is None:
                return SeriesOutcome(uid, "skipped", decision.reason, region=region)
            route, pipeline = decision.route, decision.route.pipeline
        outcome = analyze_series(datasets, pipeline, settings, timings, loaded=loaded,
                                 region=region, model=route.model if route else None)
    except AnalysisRefused as exc:
        return SeriesOutcome(uid, "failed", str(exc), route.name if route else None,
                             pipeline, region=region)
    except Exception as exc:
        log.exception("series %s failed", uid)
        return SeriesOutcome(uid, "failed", f"{type(exc).__name__}: {exc}",
                             route.name if route else None, pipeline, region=region)
    outcome.route = route.name if route else None
    return outcome


def segment_summary(outcome: SeriesOutcome) -> list[dict[str, Any]]:
    if outcome.result is None:
        return []
    agreement, sources = outcome.result.agreement, outcome.result.mask_sources
    return [
        {"label": m.label, "voxels": m.voxels, "volume_ml": round(m.volume_ml, 2),
         "mean_hu": round(m.mean_hu, 1), "std_hu": round(m.std_hu, 1),
         "surface_area_mm2": round(m.surface_area_mm2, 1),
         "max_diameter_mm": round(m.max_diameter_mm, 1),
         "dice_vs_classical": (round(agreement[m.label], 4) if m.label in agreement else None),
         "mask_from": sources.get(m.label)}
        for m in outcome.result.measurements
    ]


def region_summary(region: RegionPrediction | None) -> dict[str, Any] | None:
    if region is None:
        return None
    return {"label": region.label, "probability": round(region.probability, 4),
            "probabilities": {k: round(v, 4) for k, v in region.probabilities.items()}}




def analyze_paths(
    paths: Sequence[str | Path], out_dir: Path, settings: Settings,
    pipeline: str | None = None,
) -> dict[str, Any]:
    """The offline mode: every series under ``paths`` -> SEG, SR and preview in out_dir."""
    by_series, unreadable = read_folder(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: list[dict[str, Any]] = []
    for uid, datasets in by_series.items():
        outcome = _offline_outcome(uid, datasets, settings, pipeline)
        outputs: dict[str, str] = {}
        if outcome.status == "done":
            assert outcome.seg is not None and outcome.sr is not None
            name = _output_name(uid, out_dir)
            for kind, ds in (("seg", outcome.seg), ("sr", outcome.sr)):
                target = out_dir / f"{name}.{kind}.dcm"
                target.write_bytes(dataset_bytes(ds))
                outputs[kind] = str(target)
            if outcome.preview is not None:
                target = out_dir / f"{name}.preview.png"
                target.write_bytes(png_bytes(outcome.preview))
                outputs["preview"] = str(target)
        report.append({
            "series_instance_uid": uid,
            "status": outcome.status,
            "reason": outcome.reason,
            "route": outcome.route,
            "pipeline": outcome.pipeline,
            "instances": len(datasets),
            "segments": segment_summary(outcome),
            "predicted_region": region_summary(outcome.region),
            "body_part_flag": outcome.flag,
            "outputs": outputs,
            "timings_s": {k: round(v, 3) for k, v in outcome.timings_s.items()},
        })
    return {"series": report, "unreadable": unreadable}


def _output_name(uid: str, out_dir: Path) -> str:
    """A file name for a series' outputs that stays inside ``out_dir``: its Series
    Instance UID when that is a valid UID, else a digest of whatever the file said."""
    name = uid if UID(uid).is_valid else f"series-{hashlib.sha256(uid.encode()).hexdigest()[:16]}"
    if not (out_dir / name).resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"refusing to write outside {out_dir}: {name!r}")
    return name
