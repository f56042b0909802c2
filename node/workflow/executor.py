"""Where jobs run: a pool of worker processes by default, or threads for debugging.

Both implement :class:`Executor`: take a job id, return a future that ends when the
worker has recorded the job's outcome in the database. Analysis is CPU-bound Python
and numpy; in worker processes it cannot hold the receiving process's GIL, so ingest
stays fast while a study is analysed. A Celery executor plugs in behind the same
interface later.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from node.config import ConfigError, Settings

log = logging.getLogger(__name__)


class Executor(Protocol):
    capacity: int

    def submit(self, job_id: int) -> Future[None]: ...

    def kill(self, job_id: int) -> bool:
        """Stop the worker running ``job_id`` (its future then fails); False if this
        executor cannot."""
        ...

    def check_models(self) -> None:
        """Load every configured model where jobs run; a model that does not fit its
        card raises :class:`~node.config.ConfigError` naming it."""

    def shutdown(self) -> None:
        """Stop at once: running jobs are abandoned (their leases are released by the
        caller, and another process runs them again)."""
        ...


class _Slot:
    """One worker process (a single-process pool): killing it stops exactly one job."""

    def __init__(self, make: Callable[[], ProcessPoolExecutor]) -> None:
        self._make = make
        self.pool = make()
        self.job: int | None = None

    def kill(self, replace: bool = True) -> None:
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if replace:
            self.pool = self._make()  # the replacement starts (and warms up) at once


class ProcessExecutor:
    """Runs jobs in ``jobs.workers`` spawned processes, each set up once.

    Each worker is its own single-process pool (a slot), so a job over
    ``jobs.timeout_s`` can be stopped by killing its process alone. A worker that dies
    (killed, out of memory) fails its job's future, the job runner requeues the job, and
    the slot gets a fresh process.
    """

    def __init__(self, settings: Settings) -> None:
        self.capacity = settings.jobs.workers
        self._config = settings.model_dump(mode="json")
        self._has_models = bool(settings.models)
        self._lock = threading.Lock()
        # No routes, no jobs: a node that only receives never starts workers.
        self._slots: list[_Slot] = (
            [_Slot(self._new_pool) for _ in range(self.capacity)] if settings.routes else [])

    def check_models(self) -> None:
        """Load the configured models in a worker: TensorFlow stays out of this process."""
        from node.workflow import worker

        if not self._has_models:
            return
        with self._lock:
            if not self._slots:
                self._slots = [_Slot(self._new_pool) for _ in range(self.capacity)]
            pool = self._slots[0].pool
        if error := pool.submit(worker.check_models).result():
            raise ConfigError(error)

    def _new_pool(self) -> ProcessPoolExecutor:
        from node.workflow import worker

        # spawn, not fork: the node's threads (reactor, database pools) must not be
        # copied into a child mid-operation.
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self._config,),
        )
        # Start the worker now so its imports and set-up do not delay the first job.
        pool.submit(worker.warm_up)
        return pool

    def submit(self, job_id: int) -> Future[None]:
        from node.workflow import worker

        with self._lock:
            if not self._slots:
                self._slots = [_Slot(self._new_pool) for _ in range(self.capacity)]
            slot = next((s for s in self._slots if s.job is None), None)
            if slot is None:
                raise RuntimeError("no free analysis worker (more jobs than jobs.workers)")
            slot.job = job_id
            try:
                future = slot.pool.submit(worker.run_job, job_id)
            except BrokenProcessPool:
                log.warning("analysis worker was broken; starting a new one")
                slot.kill()
                future = slot.pool.submit(worker.run_job, job_id)
        future.add_done_callback(lambda _f: self._free(slot, job_id))
        return future

    def _free(self, slot: _Slot, job_id: int) -> None:
        with self._lock:
            if slot.job == job_id:
                slot.job = None

    def kill(self, job_id: int) -> bool:
        with self._lock:
            slot = next((s for s in self._slots if s.job == job_id), None)
            if slot is not None:
                slot.kill()
                slot.job = None
        return slot is not None

    def shutdown(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, []
        for slot in slots:
            if slot.job is not None:
                slot.kill(replace=False)
            slot.pool.shutdown(wait=True, cancel_futures=True)


class InlineExecutor:
    """Runs jobs on threads of this process (``jobs.executor: inline``): for debugging."""

    def __init__(self, settings: Settings) -> None:
        from node.workflow import worker

        self.capacity = settings.jobs.workers
        worker.init_worker(settings.model_dump(mode="json"), child=False)
        self._pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="job")
        self._settings = settings

    def check_models(self) -> None:
        """Jobs run in this process here, so the models are checked here too."""
        from node.workflow.ml_models import check_models

        check_models(self._settings)

    def submit(self, job_id: int) -> Future[Any]:
        from node.workflow import worker

        return self._pool.submit(worker.run_job, job_id)

    def kill(self, job_id: int) -> bool:
        return False  # a thread cannot be stopped from outside

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(settings: Settings) -> Executor:
    if settings.jobs.executor == "inline":
        return InlineExecutor(settings)
    return ProcessExecutor(settings)
