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
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from node.config import ConfigError, Settings

log = logging.getLogger(__name__)


class Executor(Protocol):
    capacity: int

    def submit(self, job_id: int) -> Future[None]: ...

    def check_models(self) -> None:
        """Load every configured model where jobs run; a model that does not fit its
        card raises :class:`~node.config.ConfigError` naming it."""

    def shutdown(self) -> None: ...


class ProcessExecutor:
    """Runs jobs in ``jobs.workers`` spawned processes, each set up once.

    A worker that dies (killed, out of memory) breaks the pool: its future fails, the
    job runner requeues the job, and the next submit gets a fresh pool.
    """

    def __init__(self, settings: Settings) -> None:
        self.capacity = settings.jobs.workers
        self._config = settings.model_dump(mode="json")
        self._has_models = bool(settings.models)
        self._lock = threading.Lock()
        # No routes, no jobs: a node that only receives never starts workers.
        self._pool: ProcessPoolExecutor | None = self._new_pool() if settings.routes else None

    def check_models(self) -> None:
        """Load the configured models in a worker: TensorFlow stays out of this process."""
        from node.workflow import worker

        if not self._has_models:
            return
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            pool = self._pool
        if error := pool.submit(worker.check_models).result():
            raise ConfigError(error)

    def _new_pool(self) -> ProcessPoolExecutor:
        from node.workflow import worker

        # spawn, not fork: the node's threads (reactor, database pools) must not be
        # copied into a child mid-operation.
        pool = ProcessPoolExecutor(
            max_workers=self.capacity,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self._config,),
        )
        # Start the workers now so their imports and set-up do not delay the first job.
        for _ in range(self.capacity):
            pool.submit(worker.warm_up)
        return pool

    def submit(self, job_id: int) -> Future[None]:
        from node.workflow import worker

        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            try:
                return self._pool.submit(worker.run_job, job_id)
            except BrokenProcessPool:
                log.warning("analysis worker pool was broken; starting a new one")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                return self._pool.submit(worker.run_job, job_id)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(settings: Settings) -> Executor:
    if settings.jobs.executor == "inline":
        return InlineExecutor(settings)
    return ProcessExecutor(settings)
