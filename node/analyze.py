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
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom import Dataset

from analysis.types import ImageVolume, PipelineResult
from node import __version__
from node.config import Settings

if TYPE_CHECKING:
    from analysis.region import RegionPrediction

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
    region: RegionPrediction | None = None
    flag: str | None = None  # BodyPartExamined contradicts the pixels


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in {str(v).upper() for v in ds.get("ImageType", []) or []}


@dataclass
class LoadedSeries:
    """A series' images (localizers left out) and the volume built from them."""

    images: list[Dataset]
    volume: ImageVolume
    order: list[int]  # volume slice k comes from images[order[k]]

    @property
    def series_instance_uid(self) -> str:
        return str(self.images[0].SeriesInstanceUID)

    @property
    def body_part(self) -> str:
        return str(self.images[0].get("BodyPartExamined", "") or "")


def load_series(datasets: Sequence[Dataset], timings: dict[str, float]) -> LoadedSeries:
    """The volume of a series, or :class:`AnalysisRefused` with the reason."""
    from analysis.volume import VolumeError, volume_from_datasets

    images = [ds for ds in datasets if not _is_localizer(ds)]
    if not images:
        raise AnalysisRefused("only localizer (scout) images in this series")
    with timed(timings, "volume"):
        try:
            volume, order = volume_from_datasets(images)
        except VolumeError as exc:
            raise AnalysisRefused(f"cannot build a volume: {exc}") from None
    return LoadedSeries(images, volume, order)


def predict_region(loaded: LoadedSeries, timings: dict[str, float]) -> RegionPrediction | None:
    """The region classifier's reading of the pixels; ``None`` if it cannot say."""
    from analysis.region import load_region_model

    with timed(timings, "region"):
        try:
            return load_region_model().predict(loaded.volume)
        except Exception:  # the region is an aid: its failure must not fail the series
            log.exception("region prediction failed for series %s", loaded.series_instance_uid)
            return None


def region_flag(loaded: LoadedSeries, region: RegionPrediction | None) -> str | None:
    """A note when BodyPartExamined contradicts what the pixels look like."""
    from analysis.region import body_part_contradiction

    if region is None:
        return None
    return body_part_contradiction(loaded.body_part, region)


def analyze_series(
    datasets: Sequence[Dataset], pipeline_name: str, settings: Settings,
    timings: dict[str, float] | None = None, *, loaded: LoadedSeries | None = None,
    region: RegionPrediction | None = None, model: str | None = None,
) -> SeriesOutcome:
    """Run ``pipeline_name`` on one series and encode its results.

    ``loaded`` and ``region`` may come from a caller that needed them to route the
    series; ``model`` names a configured model for pipelines that use one.

    Raises
    ------
    AnalysisRefused
        When the series cannot be made into a volume or nothing was found.
    """
    from analysis.pipeline import get_pipeline
    from analysis.preview import render_overlay

    timings = {} if timings is None else timings
    loaded = loaded or load_series(datasets, timings)
    if region is None:
        region = predict_region(loaded, timings)
    pipeline = get_pipeline(pipeline_name)
    context = pipeline_context(pipeline, settings, model)
    result = pipeline.run(loaded.volume, context)
    timings.update({f"step.{name}": s for name, s in result.timings_s.items()})
    if not any(mask.any() for mask in result.masks.values()):
        raise AnalysisRefused(f"pipeline {pipeline_name} found none of "
                              f"{', '.join(result.masks)} in this series")
    seg, sr = _encode(loaded, result, pipeline, settings, region, timings)
    with timed(timings, "preview"):
        preview = render_overlay(loaded.volume, result.masks)
    outcome = SeriesOutcome(loaded.series_instance_uid, "done", pipeline=pipeline_name,
                            result=result, seg=seg, sr=sr, preview=preview, timings_s=timings,
                            region=region, flag=region_flag(loaded, region))
    if outcome.flag:
        log.warning("series %s: %s", loaded.series_instance_uid, outcome.flag)
    return outcome


def pipeline_context(pipeline: Any, settings: Settings, model: str | None) -> dict[str, Any]:
    """Inputs a pipeline's steps need beyond the volume (models, choices)."""
    from node import models

    return models.pipeline_context(pipeline, settings, model)


def _encode(
    loaded: LoadedSeries, result: PipelineResult, pipeline: Any, settings: Settings,
    region: RegionPrediction | None, timings: dict[str, float],
) -> tuple[Dataset, Dataset]:
    from node import models, results

    algorithm = results.AlgorithmInfo(name=f"pacsnode {pipeline.name}", version=__version__,
                                      family=results.AlgorithmFamily(pipeline.algorithm_family))
    identity = results.EncoderIdentity.for_node(settings.node.ae_title)
    finding, classifier = models.region_finding(region)
    with timed(timings, "encode_seg"):
        sources = results.prepare_sources([loaded.images[i] for i in loaded.order])
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
            agreement=result.agreement or None, region=finding, region_algorithm=classifier,
        )
    return seg, sr


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
    """Import and load what jobs need (TensorFlow and the models take seconds), so the
    first job does not pay for it."""
    import analysis.preview  # noqa: F401
    import analysis.volume  # noqa: F401
    import node.results  # noqa: F401
    from analysis.pipeline import get_pipeline
    from analysis.region import load_region_model
    from node.models import segmentation_model

    assert _worker is not None
    settings = _worker.settings
    load_region_model()
    for route in settings.routes:
        try:
            if get_pipeline(route.pipeline).uses_model:
                segmentation_model(settings, route.model)
        except Exception:  # the job itself will report what is wrong
            log.exception("could not load the model of route %s ahead of time", route.name)


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


def _route_named(settings: Settings, spec: Any) -> Any:
    """The route the job was queued under (for its model), if it is still configured."""
    return next((r for r in settings.routes if r.name == spec.route), None) or \
        _AnyRoute(spec.pipeline)


@dataclass(frozen=True)
class _AnyRoute:
    pipeline: str
    model: str | None = None


def _route_by_region(engine: Any, settings: Settings, spec: Any, loaded: LoadedSeries,
                     region: RegionPrediction | None) -> Any:
    """Finish routing a series whose route depends on its predicted region."""
    from db.models import JobStatus
    from node.jobs import finish_job, set_route
    from node.routing import choose_route, facts_from_datasets

    facts = facts_from_datasets(loaded.series_instance_uid, loaded.images, spec.calling_aes)
    facts = replace(facts, predicted_region=region.label if region else "other")
    decision = choose_route(facts, settings.routes)
    destinations = settings.route_destinations(decision.route) if decision.route else []
    with engine.begin() as conn:
        set_route(conn, spec.job_id, decision, destinations)
        if decision.route is None:
            finish_job(conn, spec.job_id, JobStatus.SKIPPED, decision.reason, {})
    log.info("series %s (predicted region %s): %s", loaded.series_instance_uid,
             facts.predicted_region, decision.reason)
    return decision.route


def _record_done(engine: Any, job_id: int, destinations: list[str],
                 rows: list[dict[str, Any]], timings: dict[str, float], note: str) -> None:
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
        finish_job(conn, job_id, JobStatus.DONE, note, timings, now)


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
        loaded = load_series(datasets, timings)
        region = predict_region(loaded, timings)
        pipeline, destinations = spec.pipeline, spec.destinations
        route = _route_by_region(engine, settings, spec, loaded, region) if not pipeline \
            else _route_named(settings, spec)
        if route is None:
            return  # skipped: recorded by _route_by_region
        if not pipeline:
            pipeline, destinations = route.pipeline, settings.route_destinations(route)
        outcome = analyze_series(datasets, pipeline, settings, timings, loaded=loaded,
                                 region=region, model=route.model)
        with timed(timings, "store"):
            rows = _store_outputs(_worker.store, job_id, spec.study_instance_uid, outcome)
        timings["total"] = time.perf_counter() - started
        _record_done(engine, job_id, destinations, rows, timings, outcome.flag or "")
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
            "predicted_region": region_summary(outcome.region),
            "body_part_flag": outcome.flag,
            "outputs": outputs,
            "timings_s": {k: round(v, 3) for k, v in outcome.timings_s.items()},
        })
    return {"series": report, "unreadable": unreadable}
