"""One series through its pipeline: read -> volume -> steps -> SEG + SR + preview.

:func:`analyze_series` is the one path from datasets to results, shared by the node's
workers (:func:`run_job`, which also files the results and queues their deliveries)
and the offline ``pacsnode analyze`` (:func:`analyze_paths`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset

from analysis.types import PipelineResult
from node import __version__
from node.config import Settings

log = logging.getLogger(__name__)


class AnalysisRefused(Exception):
    """A series that cannot be analysed, with a reason a user can act on."""


@dataclass
class SeriesOutcome:
    """What became of one series; ``status`` is done, skipped or failed."""

    series_instance_uid: str
    status: str
    reason: str = ""
    route: str | None = None
    pipeline: str | None = None
    result: PipelineResult | None = None
    seg: Dataset | None = None
    sr: Dataset | None = None
    preview: np.ndarray | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in {str(v).upper() for v in ds.get("ImageType", []) or []}


def analyze_series(
    datasets: Sequence[Dataset], pipeline_name: str, settings: Settings,
    timings: dict[str, float] | None = None,
) -> SeriesOutcome:
    """Run ``pipeline_name`` on one series and encode its results.

    Raises
    ------
    AnalysisRefused
        When the series cannot be made into a volume or nothing was found.
    """
    from analysis.pipeline import get_pipeline
    from analysis.preview import render_overlay
    from analysis.volume import VolumeError, volume_from_datasets
    from node import results

    timings = {} if timings is None else timings
    images = [ds for ds in datasets if not _is_localizer(ds)]
    if not images:
        raise AnalysisRefused("only localizer (scout) images in this series")
    series_uid = str(images[0].SeriesInstanceUID)
    pipeline = get_pipeline(pipeline_name)
    with timed(timings, "volume"):
        try:
            volume, order = volume_from_datasets(images)
        except VolumeError as exc:
            raise AnalysisRefused(f"cannot build a volume: {exc}") from None
    result = pipeline.run(volume)
    timings.update({f"step.{name}": s for name, s in result.timings_s.items()})
    if not any(mask.any() for mask in result.masks.values()):
        raise AnalysisRefused(f"pipeline {pipeline_name} found none of "
                              f"{', '.join(result.masks)} in this series")
    algorithm = results.AlgorithmInfo(name=f"pacsnode {pipeline_name}", version=__version__,
                                      family=results.AlgorithmFamily(pipeline.algorithm_family))
    identity = results.EncoderIdentity.for_node(settings.node.ae_title)
    with timed(timings, "encode_seg"):
        sources = results.prepare_sources([images[i] for i in order])
        seg = results.build_segmentation(
            sources, result.masks, algorithm=algorithm, identity=identity,
            series_number=settings.results.seg_series_number,
            series_description=settings.results.seg_series_description,
        )
    with timed(timings, "encode_sr"):
        sr = results.build_measurement_report(
            seg, sources, result.measurements, algorithm=algorithm, identity=identity,
            series_number=settings.results.sr_series_number,
            series_description=settings.results.sr_series_description,
        )
    with timed(timings, "preview"):
        preview = render_overlay(volume, result.masks)
    return SeriesOutcome(series_uid, "done", pipeline=pipeline_name, result=result,
                         seg=seg, sr=sr, preview=preview, timings_s=timings)


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the preview as PNG")
    return encoded.tobytes()


def segment_summary(outcome: SeriesOutcome) -> list[dict[str, Any]]:
    if outcome.result is None:
        return []
    return [
        {"label": m.label, "voxels": m.voxels, "volume_ml": round(m.volume_ml, 2),
         "mean_hu": round(m.mean_hu, 1), "std_hu": round(m.std_hu, 1),
         "surface_area_mm2": round(m.surface_area_mm2, 1),
         "max_diameter_mm": round(m.max_diameter_mm, 1)}
        for m in outcome.result.measurements
    ]


# -- in a worker process --------------------------------------------------------------


@dataclass
class _Worker:
    settings: Settings
    engine: Any
    store: Any


_worker: _Worker | None = None


def _die_with_parent() -> None:
    """A worker must not outlive a killed node: its job is requeued at the next start,
    and an orphan still running it would record a second outcome."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def init_worker(config: dict[str, Any], child: bool = True) -> None:
    """Set up a worker process once: configuration, database, store."""
    global _worker
    from db.session import make_engine
    from node.storage import InstanceStore

    settings = Settings.model_validate(config)
    if child:
        _die_with_parent()
        logging.basicConfig(level=settings.logging.level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _worker = _Worker(
        settings=settings,
        engine=make_engine(settings.database_url, settings.database.busy_timeout_s),
        store=InstanceStore(settings.storage.data_dir),
    )


def warm_up() -> None:
    """Import what jobs need, so the first job does not pay for it."""
    import analysis.pipeline  # noqa: F401
    import analysis.preview  # noqa: F401
    import analysis.volume  # noqa: F401
    import node.results  # noqa: F401


def _store_outputs(store: Any, job_id: int, study_uid: str, outcome: SeriesOutcome,
                   ) -> list[dict[str, Any]]:
    """Write the results durably (fsync'ed) before any row points at them."""
    folder = PurePosixPath("results") / study_uid / f"job-{job_id}"
    rows = []
    for kind, ds in (("seg", outcome.seg), ("sr", outcome.sr)):
        assert ds is not None
        relative = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
        store.publish(store.stage([dataset_bytes(ds)]), relative)
        rows.append({"kind": kind, "sop_class_uid": str(ds.SOPClassUID),
                     "sop_instance_uid": str(ds.SOPInstanceUID),
                     "series_instance_uid": str(ds.SeriesInstanceUID),
                     "file_path": relative.as_posix()})
    if outcome.preview is not None:
        relative = folder / "preview.png"
        store.publish(store.stage([png_bytes(outcome.preview)]), relative)
        rows.append({"kind": "preview", "sop_class_uid": None, "sop_instance_uid": None,
                     "series_instance_uid": None, "file_path": relative.as_posix()})
    return rows


def _record_done(engine: Any, job_id: int, destinations: list[str],
                 rows: list[dict[str, Any]], timings: dict[str, float]) -> None:
    from db.models import Delivery, DeliveryStatus, JobStatus, Result, utcnow
    from node.jobs import finish_job

    now = utcnow()
    with engine.begin() as conn:
        for row in rows:
            result_id = conn.execute(
                Result.__table__.insert().values(job_fk=job_id, created_at=now, **row)
            ).inserted_primary_key[0]
            if row["sop_instance_uid"] is None:
                continue  # the preview stays here
            for name in destinations:
                conn.execute(Delivery.__table__.insert().values(
                    result_fk=result_id, destination=name,
                    status=DeliveryStatus.PENDING.value, attempts=0, last_error="",
                    created_at=now, next_attempt_at=now))
        finish_job(conn, job_id, JobStatus.DONE, "", timings, now)


def run_job(job_id: int) -> None:
    """Run one claimed job and record its outcome (done or failed) in the database."""
    from node.jobs import fail_job, load_job

    assert _worker is not None, "init_worker was not called in this process"
    settings, engine = _worker.settings, _worker.engine
    spec = load_job(engine, settings.storage.data_dir, job_id)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with timed(timings, "read"):
            datasets = [pydicom.dcmread(path) for path in spec.files]
        outcome = analyze_series(datasets, spec.pipeline, settings, timings)
        with timed(timings, "store"):
            rows = _store_outputs(_worker.store, job_id, spec.study_instance_uid, outcome)
        timings["total"] = time.perf_counter() - started
        _record_done(engine, job_id, spec.destinations, rows, timings)
        log.info("job %s: series %s analysed in %.2f s", job_id,
                 spec.series_instance_uid, timings["total"])
    except AnalysisRefused as exc:
        log.warning("job %s: series %s not analysed: %s", job_id, spec.series_instance_uid, exc)
        fail_job(engine, job_id, str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail_job(engine, job_id, f"{type(exc).__name__}: {exc}")


# -- offline ------------------------------------------------------------------------


def read_folder(paths: Iterable[str | Path]) -> tuple[dict[str, list[Dataset]], list[str]]:
    """Datasets grouped by series, and the files that are not DICOM instances."""
    from node.scu import iter_files

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
    from node.routing import choose_route, facts_from_datasets, never_analysed

    facts = facts_from_datasets(uid, datasets)
    if forced_pipeline is not None:
        route_name, pipeline, reason = None, forced_pipeline, never_analysed(facts)
    else:
        decision = choose_route(facts, settings.routes)
        route_name = decision.route.name if decision.route else None
        pipeline = decision.route.pipeline if decision.route else None
        reason = decision.reason if decision.skipped else None
    if reason is not None or pipeline is None:
        return SeriesOutcome(uid, "skipped", reason or "no pipeline")
    try:
        outcome = analyze_series(datasets, pipeline, settings)
    except AnalysisRefused as exc:
        return SeriesOutcome(uid, "failed", str(exc), route_name, pipeline)
    except Exception as exc:
        log.exception("series %s failed", uid)
        return SeriesOutcome(uid, "failed", f"{type(exc).__name__}: {exc}", route_name,
                             pipeline)
    outcome.route = route_name
    return outcome


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
            for kind, ds in (("seg", outcome.seg), ("sr", outcome.sr)):
                target = out_dir / f"{uid}.{kind}.dcm"
                target.write_bytes(dataset_bytes(ds))
                outputs[kind] = str(target)
            if outcome.preview is not None:
                target = out_dir / f"{uid}.preview.png"
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
            "outputs": outputs,
            "timings_s": {k: round(v, 3) for k, v in outcome.timings_s.items()},
        })
    return {"series": report, "unreadable": unreadable}
