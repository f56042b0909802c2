"""Throughput under load: receivers on PostgreSQL and Celery workers over RabbitMQ.

Run with ``make bench`` or ``.venv/bin/python bench/throughput.py``. Two parts, each
side by side in one run:

1. **Receiving.** 8 concurrent ``storescu`` associations, each sending its own 50-slice
   512x512 CT study (fresh UIDs per association and per configuration), to DCMTK
   ``storescp --fork``, to one ``pacsnode serve`` and to two (4 associations each, one
   database, one storage folder). Wall time from the first association to the last
   acknowledged instance; the node's ratio is against storescp in the same run.
2. **Analysis.** The 8 studies sent to one receiver with ``jobs.executor: celery``,
   analysed by 1 and then 2 ``pacsnode worker`` processes (``--concurrency 1`` each),
   results delivered to a real Orthanc: studies per hour (8 studies over the time from
   the last instance sent to the last SR listed in Orthanc) and each study's latency
   from its last instance to its SEG and SR in Orthanc.

Needs PostgreSQL (``PACSNODE_BENCH_POSTGRES``, default the test server) and RabbitMQ
(``PACSNODE_BENCH_RABBITMQ``). Results are printed and written to
``bench/out/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg import temporary_database  # noqa: E402
from run import (  # noqa: E402
    OUT,
    PYTHON,
    RoundSeries,
    base_env,
    cached_series,
    environment,
    free_port,
    prepare_rounds,
    running,
    wait_for_port,
)

from tests.orthanc import Orthanc  # noqa: E402

POSTGRES = os.environ.get("PACSNODE_BENCH_POSTGRES",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBITMQ = os.environ.get("PACSNODE_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
ROUTES = json.dumps([{"name": "ct", "match": {"modality": "CT"}, "pipeline": "ct-body-lungs"}])


def database() -> Any:
    return temporary_database(POSTGRES, "pacsnode_bench")


def node_env(data: Path, db_url: str, port: int, **extra: str) -> dict[str, str]:
    env = base_env()
    env.update({
        "PACSNODE__NODE__HOST": "127.0.0.1",
        "PACSNODE__NODE__PORT": str(port),
        "PACSNODE__NODE__MAX_ASSOCIATIONS": "16",
        "PACSNODE__NODE__MAX_ASSOCIATIONS_PER_HOST": "16",
        "PACSNODE__STORAGE__DATA_DIR": str(data),
        "PACSNODE__DATABASE__URL": db_url,
        "PACSNODE__WEB__ENABLED": "false",
        "PACSNODE__STUDY__STABLE_AGE_S": "3600",
        "PACSNODE__ROUTES": "[]",
    })
    env.update(extra)
    return env


def start_node(stack: ExitStack, folder: Path, name: str, env: dict[str, str]) -> int:
    log = folder / f"{name}.log"
    proc = stack.enter_context(running([PYTHON, "-m", "node.cli", "serve"], env, log))
    port = int(env["PACSNODE__NODE__PORT"])
    wait_for_port(port, proc, log)
    return port


def send_all(targets: list[tuple[int, str]], studies: list[RoundSeries],
             ended: dict[str, float] | None = None) -> float:
    """One storescu association per study, all at once, round-robin over ``targets``;
    the wall time until the last one ended (``ended``: each study's end, time.time())."""
    errors: list[str] = []
    ended = {} if ended is None else ended

    def one(port: int, aet: str, series: RoundSeries) -> None:
        result = subprocess.run(["storescu", "-aec", aet, "127.0.0.1", str(port),
                                 *map(str, series.paths)], env=base_env(),
                                capture_output=True, text=True, timeout=900)
        ended[series.study_instance_uid] = time.time()
        if result.returncode != 0:
            errors.append(result.stderr[-500:])

    os.sync()
    threads = [threading.Thread(target=one, args=(*targets[i % len(targets)], series))
               for i, series in enumerate(studies)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("storescu failed:\n" + "\n".join(errors))
    return elapsed


def count_instances(db_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as conn:
        count = int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
    engine.dispose()
    return count


def receive(sources: list[Path], folder: Path, associations: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for config in ("storescp --fork", "1 receiver", "2 receivers"):
        home = folder / config.replace(" ", "_").replace("-", "")
        home.mkdir()
        studies = prepare_rounds(sources, associations, home / "series")
        with ExitStack() as stack:
            if config.startswith("storescp"):
                port = free_port()
                (home / "out").mkdir()
                proc = stack.enter_context(running(
                    ["storescp", "--fork", "-aet", "STORESCP", "--output-directory",
                     str(home / "out"), str(port)], base_env(), home / "storescp.log"))
                wait_for_port(port, proc, home / "storescp.log")
                results[config] = send_all([(port, "STORESCP")], studies)
                continue
            db_url = stack.enter_context(database())
            ports = [start_node(stack, home, f"node{i}",
                                node_env(home / "var", db_url, free_port()))
                     for i in range(int(config[0]))]
            results[config] = send_all([(p, "PACSNODE") for p in ports], studies)
            expected = sum(len(s.paths) for s in studies)
            if (held := count_instances(db_url)) != expected:
                raise RuntimeError(f"{config}: {held} instances indexed, expected {expected}")
        print(f"receive, {config}: {results[config]:.2f} s", flush=True)
    return results


def _in_orthanc(orthanc: Orthanc, uids: list[str], timeout: float) -> dict[str, float]:
    """When each study's SEG and SR were first listed (time.time())."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(uids) and time.monotonic() < deadline:
        for uid in uids:
            if uid not in seen:
                counts = orthanc.modalities_of_study(uid)
                if counts.get("SEG") and counts.get("SR"):
                    seen[uid] = time.time()
        time.sleep(0.1)
    if len(seen) < len(uids):
        raise RuntimeError(f"{len(uids) - len(seen)} studies without SEG and SR after {timeout} s")
    return seen


def analyse(sources: list[Path], folder: Path, studies_n: int, workers: int) -> dict[str, Any]:
    home = folder / f"analysis-{workers}"
    home.mkdir()
    studies = prepare_rounds(sources, studies_n, home / "series")
    with ExitStack() as stack:
        orthanc = Orthanc.start(home / "orthanc")
        stack.callback(orthanc.stop)
        db_url = stack.enter_context(database())
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        env = node_env(home / "var", db_url, free_port(), **{
            "PACSNODE__STUDY__STABLE_AGE_S": "2", "PACSNODE__STUDY__CHECK_INTERVAL_S": "0.2",
            "PACSNODE__ROUTES": ROUTES, "PACSNODE__JOBS__EXECUTOR": "celery",
            "PACSNODE__JOBS__BROKER_URL": RABBITMQ, "PACSNODE__JOBS__QUEUE_PREFIX": prefix,
            "PACSNODE__JOBS__POLL_INTERVAL_S": "0.2",
            "PACSNODE__DELIVERY__POLL_INTERVAL_S": "0.5",
            "PACSNODE__DESTINATIONS": json.dumps([{
                "name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                "port": orthanc.dicom_port}]),
        })
        port = start_node(stack, home, "node", env)
        for i in range(workers):
            log = home / f"worker{i}.log"
            stack.enter_context(running([PYTHON, "-m", "node.cli", "worker", "--concurrency",
                                         "1"], env, log))
            deadline = time.monotonic() + 180
            while "ready." not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} not ready:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        ended: dict[str, float] = {}
        sent = send_all([(port, "PACSNODE")], studies, ended)
        seen = _in_orthanc(orthanc, [s.study_instance_uid for s in studies], 1800)
    window = max(seen.values()) - max(ended.values())
    latencies = sorted(seen[uid] - ended[uid] for uid in ended)
    result = {"workers": workers, "studies": studies_n, "send_s": round(sent, 2),
              "last_delivered_s": round(window, 2),
              "studies_per_hour": round(3600 * studies_n / window, 1),
              "latency_median_s": round(statistics.median(latencies), 2),
              "latency_max_s": round(latencies[-1], 2)}
    print(f"analysis, {workers} worker(s): {result}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--slices", type=int, default=50)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    sources = cached_series(args.slices)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        folder = Path(tmp)
        received = receive(sources, folder, args.associations)
        analysed = [analyse(sources, folder, args.associations, n) for n in (1, 2)]
    base = received["storescp --fork"]
    print(f"\n{args.associations} associations x {args.slices} slices of 512x512")
    for config, seconds in received.items():
        print(f"  {config:<16} {seconds:7.2f} s   {base / seconds:5.2f}x storescp --fork")
    for row in analysed:
        print(f"  {row['workers']} worker(s): {row['studies_per_hour']:.0f} studies/h, latency "
              f"last instance -> SEG+SR in Orthanc median {row['latency_median_s']:.1f} s, "
              f"max {row['latency_max_s']:.1f} s")
    (OUT / "throughput.json").write_text(json.dumps({
        "environment": environment(), "associations": args.associations,
        "slices": args.slices, "receive_s": received, "analysis": analysed,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
