"""A running node: every service wired from the settings, started and stopped as one.

``pacsnode serve``, the tests and the web server of later issues run a node the same
way::

    node = Node(settings)
    node.start()   # StartError or ConfigError say what to fix
    ...
    node.stop()

The services, in the order of the data (the README's diagram): the DICOM listener
(:mod:`node.dicom.scp`) hands each C-STORE to the ingestor (:mod:`node.ingest`), the
stability monitor marks quiet studies stable, the job runner routes their series and
runs jobs on the executor's workers (:mod:`node.workflow`), and the outbox sends the
results (a sender per destination). The receiving process never imports TensorFlow: models load, and
configured models are checked against their cards, in the analysis workers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy import Engine

from node import __version__, leases
from node.audit import atna
from node.config import Settings

log = logging.getLogger("pacsnode")


class StartError(Exception):
    """The node cannot start; the message says what to fix."""


def open_database(settings: Settings) -> Engine:
    """The engine of ``database.url`` (SQLite in the data folder by default; its file,
    which holds patient data, created ``storage.file_mode``)."""
    from db.session import make_engine

    return make_engine(settings.database_url, settings.database.busy_timeout_s,
                       file_mode=settings.storage.file_mode)


def _make_data_dir(settings: Settings) -> None:
    """Create the data folder owner-only (``storage.dir_mode``); an existing one is the
    administrator's and keeps its mode, with a warning if everyone may read it."""
    folder = settings.storage.data_dir
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(settings.storage.dir_mode)
        folder.chmod(settings.storage.dir_mode)
    elif folder.stat().st_mode & 0o007:
        log.warning("storage.data_dir %s can be read by every user of this host "
                    "(mode %04o); patient data belongs in an owner-only folder",
                    folder, folder.stat().st_mode & 0o777)


def prepare_database(engine: Engine, upgrade_empty: bool = True) -> None:
    """Create the schema on an empty database; refuse one that is behind."""
    from db import migrate

    if upgrade_empty and migrate.is_empty(engine):
        migrate.upgrade(engine)
        log.info("created the database schema (revision %s)", migrate.head_revision())
        return
    current, head = migrate.current_revision(engine), migrate.head_revision()
    if current != head:
        raise StartError(
            f"the database is at schema revision {current or 'none'}, this version needs "
            f"{head}: run 'pacsnode db upgrade' first"
        )


def check_pipelines(settings: Settings) -> None:
    """Every route names a pipeline that exists (no model is loaded for this)."""
    if settings.routes:
        from analysis.pipeline import pipeline_names

        settings.check_pipelines(pipeline_names())


class Node:
    """The node's services, wired from ``settings``.

    Parameters
    ----------
    settings
        The validated configuration (:func:`node.config.load_settings`).

    Attributes
    ----------
    engine
        The database engine, once started.
    port
        The port the DICOM listener is bound to, once started (``node.port: 0`` binds
        a free one).
    tls_port
        The DICOM TLS listener's port, once started; ``None`` without ``node.tls``.
    web_port
        The web server's port, once started; ``None`` with ``web.enabled: false``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        # Stopped in reverse order of starting: the listener first, the database last.
        self._stops: list[Callable[[], None]] = []
        self.port: int | None = None
        self.tls_port: int | None = None
        self.web_port: int | None = None
        self.scp: Any = None
        self.ingestor: Any = None
        self.lease: Any = None
        self._runner: Any = None
        self._sender: Any = None

    def start(self) -> None:
        """Start every service; on an error, stop what was started and raise it.

        Raises
        ------
        StartError
            The database is behind, or the port is taken.
        node.config.ConfigError
            A route names no pipeline, or a configured model does not fit its card.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        log.info("pacsnode %s ready: AE %s, data in %s, database %s", __version__,
                 self.settings.node.ae_title, self.settings.storage.data_dir.resolve(),
                 self.engine.url.render_as_string(hide_password=True) if self.engine else "-")

    def reload(self, settings: Settings) -> None:
        """Apply a changed configuration while running (``pacsnode serve`` on SIGHUP).

        The allow-list (``security``, its host names resolved again) and the TLS
        listener's certificate, key and CA files take effect for new associations;
        anything else is logged as needing a restart.

        Raises
        ------
        node.config.ConfigError
            The new configuration cannot be applied; the running one stays whole.
        """
        from node.dicom.access import CallingAEPolicy
        from node.dicom.tls import server_context

        if self.scp is None:
            raise StartError("the node is not running")
        policy = CallingAEPolicy(settings.security)
        tls = settings.node.tls
        context = server_context(tls) if tls is not None and self.tls_port else None
        self.scp.reload(policy, context)
        log.info("reloaded: security: %s%s", policy.describe(),
                 "; TLS certificates read again" if context is not None else "")
        if later := _needs_restart(self.settings, settings):
            log.warning("changed, but applied only at the next start: %s", ", ".join(later))

    def drain(self) -> None:
        """A graceful stop (SIGTERM): accept no new connections, let the C-STOREs in
        flight finish within ``node.shutdown_timeout_s`` (new ones get 0xA700, which a
        sender retries), then :meth:`stop`, which releases our leases so that the next
        process, or another one already running, takes the rest at once."""
        budget = self.settings.node.shutdown_timeout_s
        if self.scp is not None and not self.scp.drain(budget):
            log.warning("C-STOREs still in flight after %s s (node.shutdown_timeout_s): "
                        "aborting them; their senders keep them and send them again", budget)
        self.stop()

    def stop(self) -> None:
        """Stop every started service, newest first; safe to call twice."""
        while self._stops:
            self._stops.pop()()

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    # -- wiring ----------------------------------------------------------------------

    def _start(self) -> None:
        from node.dicom.access import CallingAEPolicy
        from node.dicom.scp import ListenError, StorageSCP
        from node.ingest.associations import AssociationLog
        from node.ingest.index import InstanceIndex
        from node.ingest.ingestor import Ingestor
        from node.ingest.storage import InstanceStore
        from node.workflow.commitment import CommitmentReports

        settings = self.settings
        check_pipelines(settings)
        policy = CallingAEPolicy(settings.security)  # resolves host names: fail early
        _check_destination_tls(settings)
        _make_data_dir(settings)
        engine = self.engine = open_database(settings)
        self._stops.append(engine.dispose)
        prepare_database(engine)
        atna.start(settings, engine, "serve")  # Application Start; Stop when stopped
        self._stops.append(atna.stop)
        lease = self.lease = leases.register(engine, settings.jobs.lease_s, __version__)
        # On a clean stop what we still hold is released, so the next process (or another
        # one already running) takes it at once rather than after the lease.
        self._stops.append(lambda: leases.release(engine, lease))
        audit = AssociationLog(engine, lease)
        store = InstanceStore(settings.storage.data_dir, settings.storage.file_mode,
                              settings.storage.dir_mode)
        index = InstanceIndex(engine)
        if removed := store.clean_incoming():
            log.info("removed %s staged files abandoned by an earlier crash", removed)
        ingestor = Ingestor(
            store, index, audit, workers=2 * settings.node.max_associations,
            max_instance_bytes=settings.node.max_instance_mb << 20,
        )
        self._stops.append(ingestor.close)
        self.ingestor = ingestor
        on_stable = self._start_workflow(engine, lease)
        self._start_heartbeat(engine, lease, audit, index, store)
        scp = self.scp = StorageSCP(settings.node, ingestor, audit, policy,
                                    commitments=CommitmentReports(engine, settings.delivery))
        self._stops.append(scp.stop)  # also when only one of the two listeners started
        try:
            _host, self.port = scp.start()
        except ListenError as exc:
            raise StartError(str(exc)) from None
        self.tls_port = scp.tls_port
        log.log(logging.WARNING if policy.loopback_only and not _loopback(settings.node.host)
                else logging.INFO, "security: %s", policy.describe())
        self._start_monitor(engine, on_stable)
        self._start_web(engine)

    def _start_web(self, engine: Engine) -> None:
        """The dashboard, API and operations endpoints, in their own thread."""
        if not self.settings.web.enabled:
            return
        from node.web.server import WebServer

        web = WebServer(self.settings, engine,
                        lambda: sorted({p for p in (self.port, self.tls_port) if p}))
        try:
            self.web_port = web.start()
        except OSError as exc:
            raise StartError(str(exc)) from None
        self._stops.append(web.stop)

    def _start_workflow(self, engine: Engine, lease: Any) -> Callable[[Any], None]:
        """Start what turns stable studies into results; returns what wakes it.

        With the process (or inline) executor: check the models in a worker, start the
        job runner and the outbox (a sender per destination). With ``jobs.executor:
        celery``: only the enqueuer, which routes and sends tasks to the broker; the
        ``pacsnode worker`` processes analyse and deliver.
        """
        if self.settings.jobs.executor == "celery":
            return self._start_enqueuer(engine)
        from node.workflow import delivery
        from node.workflow.executor import make_executor
        from node.workflow.runner import JobRunner

        settings = self.settings
        executor = make_executor(settings)
        self._stops.append(executor.shutdown)
        executor.check_models()
        sender = self._sender = delivery.Outbox(engine, settings, lease)
        runner = self._runner = JobRunner(engine, settings, executor, lease,
                                          on_job_end=sender.wake.set)
        sender.start()
        self._stops.append(sender.stop)
        runner.start()
        self._stops.append(runner.stop)
        return lambda _uids: runner.wake.set()

    def _start_enqueuer(self, engine: Engine) -> Callable[[Any], None]:
        from db.tables import utcnow
        from node.workflow import breaker, broker
        from node.workflow.enqueue import Enqueuer

        app = broker.make_app(self.settings)
        breaker.ensure(engine, [dest.name for dest in self.settings.destinations], utcnow())
        enqueuer = self._runner = Enqueuer(engine, self.settings, app)
        enqueuer.start()
        self._stops.append(enqueuer.stop)
        self._stops.append(lambda: app.close())
        log.info("jobs go to the broker at %s (queues %s.analysis, %s.delivery): "
                 "'pacsnode worker' runs them", _hide_password(self.settings.jobs.broker_url),
                 self.settings.jobs.queue_prefix, self.settings.jobs.queue_prefix)
        return lambda _uids: enqueuer.wake.set()

    def _start_heartbeat(self, engine: Engine, lease: Any, audit: Any, index: Any,
                         store: Any) -> None:
        """Renew our leases, and take over the work of processes whose leases expired
        (here, or on any other host): once now, then on every beat."""
        from node.workflow import delivery, jobs

        max_attempts = self.settings.jobs.max_attempts

        def associations(_engine: Engine, now: Any) -> int:
            return _close_expired_associations(audit, index, store, now)

        def wake() -> None:
            self._runner.wake.set()
            if self._sender is not None:
                self._sender.wake.set()

        heartbeat = leases.Heartbeat(engine, lease, [
            associations,
            lambda e, now: jobs.take_over_expired(e, now, max_attempts),
            delivery.take_over_expired,
        ], on_takeover=wake)
        heartbeat.beat()
        heartbeat.start()
        self._stops.append(heartbeat.stop)

    def _start_monitor(self, engine: Engine, on_stable: Callable[[Any], None]) -> None:
        from node.workflow.stability import StabilityMonitor

        study = self.settings.study
        monitor = StabilityMonitor(engine, study.stable_age_s, study.check_interval_s,
                                   on_stable=on_stable)
        monitor.start()
        self._stops.append(monitor.stop)


def _close_expired_associations(audit: Any, index: Any, store: Any, now: Any) -> int:
    """Close associations whose process died with them open (its lease expired), and
    drop the rows of what they never acknowledged."""
    interrupted = audit.close_expired(now)
    if interrupted:
        log.warning("%s associations were interrupted: their process stopped renewing "
                    "its lease", len(interrupted))
        for uid in index.drop_unfiled(interrupted, store.exists):
            log.warning("removed the row of never-acknowledged instance %s (no file)", uid)
    return len(interrupted)


def _needs_restart(running: Settings, new: Settings) -> list[str]:
    """The keys that differ, other than those :meth:`Node.reload` applies."""
    old_values, new_values = running.model_dump(), new.model_dump()
    for values in (old_values, new_values):
        values.pop("security")
        if values["node"].get("tls"):
            values["node"]["tls"].pop("certificate")
            values["node"]["tls"].pop("private_key")
            values["node"]["tls"].pop("ca_certificates")
    changed = []
    for section in sorted(set(old_values) | set(new_values)):
        old, fresh = old_values.get(section), new_values.get(section)
        if isinstance(old, dict) and isinstance(fresh, dict):
            changed += [f"{section}.{key}" for key in sorted(set(old) | set(fresh))
                        if old.get(key) != fresh.get(key)]
        elif old != fresh:
            changed.append(section)
    return changed


def _check_destination_tls(settings: Settings) -> None:
    """A TLS destination's CA, certificate and key load now, not at the first result."""
    from node.workflow.delivery import destination_peer

    for dest in settings.destinations:
        peer = destination_peer(settings, dest)
        if peer.tls is not None:
            peer.tls.context()


def _hide_password(url: str | None) -> str:
    """A broker URL for the log: its password replaced."""
    from sqlalchemy.engine import make_url

    if not url:
        return "-"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not SQLAlchemy's syntax: say only where it is
        return url.split("@")[-1]


def _loopback(host: str) -> bool:
    """Whether the listener is reachable from this host only (then loopback-only is
    what the administrator gets anyway, and not worth a warning)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
