"""The database at scale: every query the node makes, on 100,000 studies and 10 million
instance rows in PostgreSQL.

Run with ``make bench`` or ``.venv/bin/python bench/db_scale.py [--studies N]
[--instances N] [--url URL] [--keep]``. It

1. creates its own database (``pacsnode_scale_*``) at the schema's head revision;
2. generates, on the server (``generate_series``, so no rows cross the socket):
   patients, one association per study, 3 series per study (a scout and two image
   series), instances so that there are ``--instances`` in all, a job per image
   series (done for analysed studies; queued and running for the newest), results
   and deliveries for the done ones; the newest studies are receiving, stable or
   processing; received times spread over the last days, 5 s apart;
3. times each query through the node's own functions (the studies list and search,
   a study's detail, the stability check, job claiming and enqueueing, lease renewal,
   the outbox's claim, the dashboard and the web's lists, the ingest lookups) and
   the paths fixed at scale (``pacsnode studies`` over every study, a ``/metrics``
   scrape, the claim of 100 due deliveries, the calling-AE search both ways round),
   with the indexes of migrations 0010 and 0011 and, side by side on the same rows,
   without them (``--database URL`` of a kept database: only the fixed paths, with
   this checkout's code, to compare code before and after on the same rows);
4. prints median and slowest of the repetitions in ms, writes
   ``bench/out/db_scale.json`` and the query plans (``EXPLAIN (ANALYZE, BUFFERS)`` of
   the SQL the heaviest calls send) to ``bench/out/db_scale_plans.txt``, and drops the
   database unless ``--keep``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, create_engine, text  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))

from pg import temporary_database  # noqa: E402

from db.migrate import upgrade  # noqa: E402
from db.tables import utcnow  # noqa: E402

OUT = ROOT / "bench" / "out"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SERIES_PER_STUDY = 3
#: The newest studies' states: receiving, stable, processing; the rest analysed.
RECENT = {"receiving": 50, "stable": 50, "processing": 200}


#: Deliveries to one more destination, all due: the claim of a full batch (BATCH).
CLAIM_DESTINATION = "claim-bench"


def _migration_0010() -> Any:
    return _migration("0010_indexes_at_scale.py")


def _migration_0011() -> Any | None:
    """Migration 0011, or None when timing code from before it (``--database``)."""
    found = sorted((ROOT / "db" / "migrations" / "versions").glob("0011_*.py"))
    return _migration(found[0].name) if found else None


def _migration(name: str) -> Any:
    path = ROOT / "db" / "migrations" / "versions" / name
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- generation -------------------------------------------------------------------


def _status_case(studies: int) -> str:
    receiving = studies - RECENT["receiving"]
    stable = receiving - RECENT["stable"]
    processing = stable - RECENT["processing"]
    return (f"CASE WHEN g > {receiving} THEN 'receiving' WHEN g > {stable} THEN 'stable' "
            f"WHEN g > {processing} THEN 'processing' ELSE 'analyzed' END")


def generate(engine: Engine, studies: int, instances: int) -> None:
    patients = max(1, studies * 6 // 10)
    per_series = max(1, (instances // studies - 2) // 2)  # a 2-instance scout + 2 series
    spread = min(10, per_series - 1)
    t0 = utcnow() - timedelta(seconds=5 * studies)
    params = {"t0": t0, "studies": studies, "patients": patients}
    statements = [
        f"""INSERT INTO patients (id, patient_id, issuer, patient_name, birth_date, sex)
            SELECT g, 'PID' || lpad(g::text, 9, '0'), '', 'PATIENT' || g || '^TEST',
                   '19600101', 'O' FROM generate_series(1, {patients}) g""",
        """INSERT INTO associations (id, calling_ae, called_ae, peer_host, peer_port,
               started_at, ended_at, instances_stored, instances_duplicate, instances_failed,
               outcome, tls)
            SELECT g, 'MODALITY' || (g % 20), 'PACSNODE', '10.0.0.' || (g % 250), 11112,
                   :t0 + g * interval '5 seconds', :t0 + g * interval '5 seconds' + interval
                   '60 seconds', 100, 0, 0, 'closed', false
            FROM generate_series(1, :studies) g""",
        f"""INSERT INTO studies (id, study_instance_uid, patient_fk, study_date, study_time,
               accession_number, study_description, status, received_at, last_received_at,
               stable_at)
            SELECT g, '1.2.826.0.1.3680043.10.1.' || g, 1 + (g % :patients),
                   to_char(date '2026-01-01' + (g / 300), 'YYYYMMDD'), '120000', 'ACC' || g,
                   'CT CHEST', {_status_case(studies)}, :t0 + g * interval '5 seconds',
                   :t0 + g * interval '5 seconds' + interval '60 seconds',
                   :t0 + g * interval '5 seconds' + interval '70 seconds'
            FROM generate_series(1, :studies) g""",
        f"""INSERT INTO series (id, series_instance_uid, study_fk, modality, series_number,
               series_description, body_part_examined, received_at)
            SELECT (g - 1) * {SERIES_PER_STUDY} + k, '1.2.826.0.1.3680043.10.2.' || g || '.' || k,
                   g, 'CT', k, CASE k WHEN 1 THEN 'Topogram' ELSE 'Thorax' END, 'CHEST',
                   :t0 + g * interval '5 seconds'
            FROM generate_series(1, :studies) g, generate_series(1, {SERIES_PER_STUDY}) k""",
    ]
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql), params)
    count = (f"CASE s.series_number WHEN 1 THEN 2 ELSE {per_series - spread} "
             f"+ (s.id % {2 * spread + 1}) END")
    step = 5000
    for first in range(1, studies + 1, step):
        with engine.begin() as conn:
            conn.execute(text(f"""
                INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk,
                    instance_number, transfer_syntax_uid, file_path, file_size, received_at,
                    association_fk)
                SELECT s.series_instance_uid || '.' || i, '1.2.840.10008.5.1.4.1.1.2', s.id, i,
                       '1.2.840.10008.1.2.1', 'studies/' || s.study_fk || '/' || s.id || '/'
                       || i || '.dcm', 526000, s.received_at + i * interval '10 milliseconds',
                       s.study_fk
                FROM series s CROSS JOIN LATERAL generate_series(1, {count}) i
                WHERE s.study_fk BETWEEN :a AND :b"""), {"a": first, "b": first + step - 1})
        print(f"  instances: studies {first}-{min(first + step - 1, studies)}", end="\r",
              flush=True)
    print()
    _generate_work(engine, studies, t0)


def _generate_work(engine: Engine, studies: int, t0: Any) -> None:
    """Jobs for the image series; results and deliveries for the done ones."""
    processing_from = studies - sum(RECENT.values())
    with engine.begin() as conn:
        conn.execute(text(f"""
            INSERT INTO jobs (study_fk, series_fk, route, pipeline, destinations, status,
                reason, instances, attempt, queued_at, started_at, finished_at, timings)
            SELECT s.study_fk, s.id, 'ct', 'ct-body-lungs', '["pacs"]',
                   CASE WHEN st.status = 'analyzed' THEN 'done'
                        WHEN s.id % 2 = 0 THEN 'running' ELSE 'queued' END,
                   '', 50, 1, st.stable_at, st.stable_at + interval '1 second',
                   CASE WHEN st.status = 'analyzed' THEN st.stable_at + interval '9 seconds' END,
                   '{{}}'
            FROM series s JOIN studies st ON st.id = s.study_fk
            WHERE s.series_number > 1 AND st.status IN ('analyzed', 'processing')
              AND st.id <= {processing_from + RECENT['processing']}"""))
        conn.execute(text("""
            INSERT INTO results (job_fk, kind, sop_class_uid, sop_instance_uid,
                series_instance_uid, file_path, created_at)
            SELECT j.id, k.kind, '1.2.840.10008.5.1.4.1.1.66.4',
                   CASE WHEN k.kind = 'preview' THEN NULL
                        ELSE '1.2.826.0.1.3680043.10.3.' || j.id || '.' || k.n END,
                   CASE WHEN k.kind = 'preview' THEN NULL
                        ELSE '1.2.826.0.1.3680043.10.4.' || j.id || '.' || k.n END,
                   'results/' || j.id || '/' || k.kind, j.finished_at
            FROM jobs j, (VALUES (1, 'seg'), (2, 'sr'), (3, 'preview')) AS k(n, kind)
            WHERE j.status = 'done'"""))
        conn.execute(text("""
            INSERT INTO deliveries (result_fk, destination, status, attempts, last_error,
                created_at, queued_at, next_attempt_at, last_attempt_at, sent_at,
                commitment_requests)
            SELECT r.id, 'pacs', CASE WHEN r.job_fk % 500 = 0 THEN 'pending' ELSE 'sent' END,
                   1, '', r.created_at, r.created_at, r.created_at, r.created_at,
                   CASE WHEN r.job_fk % 500 = 0 THEN NULL ELSE r.created_at END, 0
            FROM results r WHERE r.sop_instance_uid IS NOT NULL"""))
        conn.execute(text(f"""
            INSERT INTO deliveries (result_fk, destination, status, attempts, last_error,
                created_at, queued_at, next_attempt_at, commitment_requests)
            SELECT r.id, '{CLAIM_DESTINATION}', 'pending', 0, '', r.created_at, r.created_at,
                   r.created_at, 0
            FROM results r WHERE r.sop_instance_uid IS NOT NULL ORDER BY r.id LIMIT 100"""))
        conn.execute(text("""
            INSERT INTO destination_states (name, state, consecutive_failures, last_error,
                updated_at) VALUES ('pacs', 'closed', 0, '', now())"""))
        for table in ("patients", "associations", "studies", "series", "instances",
                      "jobs", "results", "deliveries"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                              f"(SELECT max(id) FROM {table}))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


# -- the queries ------------------------------------------------------------------


def _claim_again(engine: Engine) -> None:
    """The claim benchmark's 100 deliveries pending and due again, their events gone."""
    with engine.begin() as conn:
        conn.execute(text(f"""DELETE FROM delivery_events WHERE delivery_fk IN
            (SELECT id FROM deliveries WHERE destination = '{CLAIM_DESTINATION}')"""))
        conn.execute(text(f"""UPDATE deliveries SET status = 'pending', attempts = 0,
            owner = NULL, lease_until = NULL WHERE destination = '{CLAIM_DESTINATION}'"""))


#: A call, or (set-up run before each timed call, the call).
Timed = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]

#: The calling-AE search's two directions, counted in raw SQL (the node's is the first).
AE_STUDIES_FIRST = (
    "SELECT count(*) FROM studies WHERE id IN (SELECT se.study_fk FROM series se JOIN "
    "instances i ON i.series_fk = se.id JOIN associations a ON a.id = i.association_fk "
    "WHERE a.calling_ae = 'MODALITY7')")
AE_ASSOCIATIONS_FIRST = (
    "SELECT count(*) FROM studies WHERE id IN (SELECT se.study_fk FROM series se WHERE "
    "se.id IN (SELECT DISTINCT i.series_fk FROM associations a JOIN instances i ON "
    "i.association_fk = a.id WHERE a.calling_ae = 'MODALITY7'))")


def fixed_paths(engine: Engine) -> dict[str, Timed]:
    """The paths that were slow or failed at scale, timed as the node runs them."""
    from node.audit_queries import list_studies
    from node.leases import Lease
    from node.web.metrics import DatabaseCollector
    from node.workflow import outbox

    scraped = DatabaseCollector(engine)
    lease = Lease(str(uuid.uuid4()), 30)

    def count(sql: str) -> Callable[[], Any]:
        def run() -> Any:
            with engine.connect() as conn:
                return conn.execute(text(sql)).scalar_one()
        return run

    return {
        "pacsnode studies (every study)": lambda: len(list_studies(engine)),
        "metrics: first scrape of a process": lambda: list(DatabaseCollector(engine).collect()),
        "metrics: a scrape": lambda: list(scraped.collect()),
        "outbox: claim 100 due deliveries": (lambda: _claim_again(engine), lambda: outbox.claim_due(
            engine, CLAIM_DESTINATION, Path("/nonexistent"), utcnow(), lease)),
        "calling AE: studies -> series -> associations": count(AE_STUDIES_FIRST),
        "calling AE: associations -> series -> studies": count(AE_ASSOCIATIONS_FIRST),
    }


def queries(engine: Engine, studies: int) -> dict[str, Timed]:
    """Every query the node makes at scale, as the node makes it."""
    from node.audit_queries import StudyFilter, search_studies, study_detail
    from node.ingest.index import InstanceIndex
    from node.leases import Lease, renew
    from node.web import read_model
    from node.workflow import jobs, outbox
    from node.workflow.enqueue import destinations_due
    from node.workflow.stability import mark_stable

    index = InstanceIndex(engine)
    lease = Lease(str(uuid.uuid4()), 30)
    middle = studies // 2
    patient = f"PID{1 + middle % max(1, studies * 6 // 10):09d}"

    def enqueue_scan() -> Any:
        with engine.begin() as conn:
            ids = jobs.take_to_enqueue(conn, utcnow(), 1800)
            conn.rollback()
        return ids

    return {
        "studies: page 1 (50, newest first)": lambda: search_studies(engine, StudyFilter()),
        "studies: page 100": lambda: search_studies(engine, StudyFilter(), page=100),
        "studies: patient ID (exact)": lambda: search_studies(
            engine, StudyFilter(patient_id=patient)),
        "studies: patient name (prefix)": lambda: search_studies(
            engine, StudyFilter(patient_name=f"patient{1 + middle % 1000}")),
        "studies: accession number": lambda: search_studies(
            engine, StudyFilter(accession_number=f"ACC{middle}")),
        "studies: study date range (a day)": lambda: search_studies(
            engine, StudyFilter(date_from="20260110", date_to="20260110")),
        "studies: by status (receiving)": lambda: search_studies(
            engine, StudyFilter(status="receiving")),
        "studies: by calling AE": lambda: search_studies(
            engine, StudyFilter(calling_ae="MODALITY7")),
        "study detail": lambda: study_detail(engine, f"1.2.826.0.1.3680043.10.1.{middle}"),
        "stability check": lambda: mark_stable(engine, 10 * 365 * 86400.0),
        "claim a queued job (process executor)": lambda: jobs.claim_jobs(engine, 1, lease),
        "jobs to enqueue (celery)": enqueue_scan,
        "a worker claims one job (celery)": lambda: jobs.claim_job(engine, 1, lease),
        "lease renewal (heartbeat)": lambda: renew(engine, lease, utcnow()),
        "lease takeover scan (jobs)": lambda: jobs.take_over_expired(engine, utcnow(), 3),
        "outbox: claim due deliveries": lambda: outbox.claim_due(
            engine, "pacs", Path("/nonexistent"), utcnow(), lease),
        "outbox: destinations due (celery)": lambda: destinations_due(
            engine, ["pacs"], utcnow()),
        "dashboard": lambda: read_model.dashboard(engine),
        "web: jobs page 1": lambda: read_model.jobs(engine),
        "web: deliveries page 1": lambda: read_model.deliveries(engine),
        "web: associations page 1": lambda: read_model.associations(engine),
        "ingest: instance lookup (duplicate check)": lambda: index.find(
            f"1.2.826.0.1.3680043.10.2.{middle}.2.7"),
        "ingest: restart a study's quiet period": lambda: index.touch_study(
            f"1.2.826.0.1.3680043.10.1.{studies}", utcnow()),
    }


def time_all(engine: Engine, studies: int, repeats: int) -> dict[str, dict[str, Any]]:
    return time_all_of(engine, {**queries(engine, studies), **fixed_paths(engine)}, repeats)


def time_all_of(engine: Engine, calls: dict[str, Timed], repeats: int
                ) -> dict[str, dict[str, Any]]:
    timings: dict[str, dict[str, Any]] = {}
    for name, timed in calls.items():
        setup, call = timed if isinstance(timed, tuple) else (lambda: None, timed)
        setup()
        try:
            call()  # warm: the first call pays for plans and cold pages
        except Exception as exc:  # code from before the fixes: the listing failed here
            timings[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        seconds = []
        for _ in range(repeats):
            setup()
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        timings[name] = {"median_ms": round(1000 * statistics.median(seconds), 2),
                         "max_ms": round(1000 * max(seconds), 2)}
    return timings


def set_indexes(engine: Engine, present: bool) -> None:
    """The schema with the indexes of migrations 0010 and 0011, or as it was at 0009."""
    migration = _migration_0010()
    add, drop = (migration.INDEXES, migration.REPLACED) if present else \
        (migration.REPLACED, migration.INDEXES)
    later = _migration_0011()
    if later is not None:
        ours, replaced = [later.CLAIM_INDEX], [later.REPLACED]
        add, drop = (add + ours, drop + replaced) if present else \
            (add + replaced, drop + ours)
    with engine.begin() as conn:
        if later is not None and engine.dialect.name == "postgresql":
            conn.execute(text(later.NAME_INDEX if present else
                              "DROP INDEX IF EXISTS ix_patients_name_lower"))
        for name, table, columns in add:
            conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} "
                              f"({', '.join(columns)})"))
        for name, _table, _columns in drop:
            conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


def plans(engine: Engine) -> str:
    """The plans of the statements behind the heaviest calls."""
    sqls = {
        "dashboard: instances received in the last hour":
            "SELECT count(*) FROM instances WHERE received_at >= now() - interval '1 hour'",
        "dashboard: deliveries by destination and status":
            "SELECT destination, status, count(*) FROM deliveries GROUP BY destination, status",
        "lease renewal: deliveries": "UPDATE deliveries SET lease_until = now() WHERE owner = "
                                     "'x' AND status = 'sending'",
        "lease renewal: associations": "UPDATE associations SET lease_until = now() WHERE "
                                       "owner = 'x' AND outcome = 'open'",
        "studies by calling AE": AE_STUDIES_FIRST,
        "studies by calling AE, from the associations": AE_ASSOCIATIONS_FIRST,
        "studies by patient name prefix (as the search sends it)":
            "SELECT count(*) FROM studies JOIN patients p ON p.id = studies.patient_fk "
            "WHERE lower(p.patient_name) LIKE 'patient123%'",
        "outbox claim: a destination's due deliveries in claim order":
            "SELECT id FROM deliveries WHERE destination = 'pacs' AND status = 'pending' "
            "AND next_attempt_at <= now() ORDER BY result_fk, id LIMIT 100",
    }
    out = []
    with engine.connect() as conn:
        for title, sql in sqls.items():
            trans = conn.begin()
            rows = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).scalars().all()
            trans.rollback()
            out.append(f"-- {title}\n{sql}\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def _figures(timing: dict[str, Any]) -> str:
    if "error" in timing:
        return f"{'failed':>14}"
    return f"{timing['median_ms']:>7.1f} /{timing['max_ms']:>6.1f}"


def fixed_only(url: str, repeats: int, out: Path) -> int:
    """The fixed paths, timed by this checkout's code (before or after the fixes) on a
    database generated before: the same rows for both."""
    engine = create_engine(url)
    try:
        timings: dict[str, dict[str, Any]] = {}
        for name, timed in fixed_paths(engine).items():
            timings.update(time_all_of(engine, {name: timed}, repeats))
            print(f"{name:<46} {timings[name]}", flush=True)
    finally:
        engine.dispose()
    (out / "db_scale_fixed.json").write_text(json.dumps(timings, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=10_000_000)
    parser.add_argument("--url", default=DEFAULT_URL, help="an existing database to "
                        "connect to for creating ours")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="leave the database in place")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON and plans go")
    parser.add_argument("--database", help="a database generated before (--keep): time "
                        "only the fixed paths on it, with the code of this checkout")
    args = parser.parse_args(argv)
    # The takeover scan takes the generated running jobs over once: not news here.
    logging.getLogger("node").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.database:
        return fixed_only(args.database, args.repeats, args.out)
    with temporary_database(args.url, "pacsnode_scale", keep=args.keep) as url:
        engine = create_engine(url)
        try:
            upgrade(engine)
            start = time.perf_counter()
            generate(engine, args.studies, args.instances)
            generated_s = time.perf_counter() - start
            with engine.connect() as conn:
                counts = {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                          for t in ("studies", "series", "instances", "jobs", "deliveries")}
            print(f"generated in {generated_s:.0f} s: {counts}", flush=True)
            set_indexes(engine, present=False)
            without = time_all(engine, args.studies, args.repeats)
            set_indexes(engine, present=True)
            with_new = time_all(engine, args.studies, args.repeats)
            (args.out / "db_scale_plans.txt").write_text(plans(engine))
        finally:
            engine.dispose()
    print(f"\n{'query':<46} {'without 0010':>14} {'with 0010':>14}   (median / max ms)")
    for query, after in with_new.items():
        print(f"{query:<46} {_figures(without[query])} {_figures(after)}")
    (args.out / "db_scale.json").write_text(json.dumps({
        "studies": args.studies, "instances": args.instances, "counts": counts,
        "generated_s": round(generated_s, 1), "without_0010": without, "with_0010": with_new,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
