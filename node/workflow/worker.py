"""In an analysis worker process: set up once, then run claimed jobs.

:func:`run_job` reads a job's series, finishes routing it when its route depends on
the predicted region, runs :func:`node.workflow.analyze.analyze_series`, writes the
results durably and records them with their deliveries in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import pydicom

from node.config import Settings
from node.leases import LeaseLost
from node.workflow.analyze import (
    AnalysisRefused,
    LoadedSeries,
    SeriesOutcome,
    analyze_series,
    dataset_bytes,
    load_series,
    png_bytes,
    predict_region,
    timed,
)

if TYPE_CHECKING:
    from analysis.region import RegionPrediction

log = logging.getLogger(__name__)


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
    from node.ingest.storage import InstanceStore

    settings = Settings.model_validate(config)
    if child:
        _die_with_parent()
        logging.basicConfig(level=settings.logging.level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _worker = _Worker(
        settings=settings,
        engine=make_engine(settings.database_url, settings.database.busy_timeout_s),
        store=InstanceStore(settings.storage.data_dir, settings.storage.file_mode,
                            settings.storage.dir_mode),
    )


def warm_up() -> None:
    """Import and load what jobs need (TensorFlow and the models take seconds), so the
    first job does not pay for it."""
    import analysis.preview  # noqa: F401
    import analysis.volume  # noqa: F401
    import node.results  # noqa: F401
    from analysis.pipeline import get_pipeline
    from analysis.region import load_region_model
    from node.workflow.ml_models import segmentation_model

    assert _worker is not None
    settings = _worker.settings
    load_region_model()
    for route in settings.routes:
        try:
            if get_pipeline(route.pipeline).uses_model:
                segmentation_model(settings, route.model)
        except Exception as exc:  # check_models or the job itself reports it in full
            log.warning("could not load the model of route %s ahead of time: %s",
                        route.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def check_models() -> str | None:
    """Load every configured model here; the error naming a bad one, or ``None``.

    The message travels back to the receiving process as text, which then refuses to
    start with it (an exception object might not survive the trip between processes).
    """
    from node.config import ConfigError
    from node.workflow.ml_models import check_models as load_all

    assert _worker is not None, "init_worker was not called in this process"
    try:
        load_all(_worker.settings)
    except ConfigError as exc:
        return str(exc)
    return None


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
    from db.tables import JobStatus
    from node.workflow.jobs import finish_job, set_route
    from node.workflow.routing import choose_route, facts_from_datasets

    facts = facts_from_datasets(loaded.series_instance_uid, loaded.images, spec.calling_aes)
    facts = replace(facts, predicted_region=region.label if region else "other")
    decision = choose_route(facts, settings.routes)
    destinations = settings.route_destinations(decision.route) if decision.route else []
    with engine.begin() as conn:
        set_route(conn, spec.job_id, decision, destinations)
        if decision.route is None:
            finish_job(conn, spec.job_id, JobStatus.SKIPPED, decision.reason, {},
                       owner=spec.owner)
    log.info("series %s (predicted region %s): %s", loaded.series_instance_uid,
             facts.predicted_region, decision.reason)
    return decision.route


def _record_done(engine: Any, job_id: int, destinations: list[str],
                 rows: list[dict[str, Any]], timings: dict[str, float], note: str,
                 owner: str | None) -> None:
    from db.tables import Delivery, DeliveryStatus, JobStatus, Result, utcnow
    from node.workflow.jobs import finish_job

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
        # The results and the job's end commit together, only if we still hold the job.
        finish_job(conn, job_id, JobStatus.DONE, note, timings, now, owner=owner)


def run_job(job_id: int, reraise: tuple[type[BaseException], ...] = ()) -> None:
    """Run one claimed job and record its outcome (done or failed) in the database;
    exceptions of the ``reraise`` types (an interruption the caller records) propagate."""
    from node.workflow.jobs import fail_job, load_job, mark_started

    assert _worker is not None, "init_worker was not called in this process"
    settings, engine = _worker.settings, _worker.engine
    spec = load_job(engine, settings.storage.data_dir, job_id)
    mark_started(engine, job_id, spec.owner)
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
        _record_done(engine, job_id, destinations, rows, timings, outcome.flag or "",
                     spec.owner)
        log.info("job %s: series %s analysed in %.2f s", job_id,
                 spec.series_instance_uid, timings["total"])
    except AnalysisRefused as exc:
        log.warning("job %s: series %s not analysed: %s", job_id, spec.series_instance_uid, exc)
        fail_job(engine, job_id, str(exc), owner=spec.owner)
    except LeaseLost:
        log.warning("job %s: taken over by another process meanwhile; its run counts, "
                    "not this one", job_id)
    except reraise:
        raise
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail_job(engine, job_id, f"{type(exc).__name__}: {exc}", owner=spec.owner)


