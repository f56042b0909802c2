"""End-to-end benchmark: from "study stable" to "SEG and SR stored in Orthanc".

Run with ``make bench`` (after the ingest benchmark) or ``.venv/bin/python bench/e2e.py``.
It starts a real Orthanc and the node (default route: CT -> ``ct-body-lungs`` -> Orthanc),
sends a generated 200-slice 512x512 CT with ``storescu`` once per round (fresh UIDs
each time), and measures, per round,

* latency: the node's ``stable_at`` timestamp to the moment Orthanc's REST API first
  lists both a SEG and an SR in the study (polled every 50 ms);
* the steps in between, from the node's audit record (``pacsnode study --json``):
  routing and queueing, each job step (read, volume, pipeline steps, SEG and SR
  encoding, preview, store), and delivery until the last result was acknowledged.

Results are printed and written to ``bench/out/e2e.json``. Target: 10 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    OUT,
    PYTHON,
    ROOT,
    base_env,
    cached_series,
    free_port,
    prepare_rounds,
    running,
    wait_for_port,
)

from tests.orthanc import Orthanc  # noqa: E402

TARGET_S = 10.0
STABLE_AGE_S = 2.0


def node_env(folder: Path, port: int, orthanc: Orthanc) -> dict[str, str]:
    env = base_env()
    env.update({
        "PACSNODE__NODE__HOST": "127.0.0.1",
        "PACSNODE__NODE__PORT": str(port),
        "PACSNODE__STORAGE__DATA_DIR": str(folder / "var"),
        "PACSNODE__STUDY__STABLE_AGE_S": str(STABLE_AGE_S),
        "PACSNODE__STUDY__CHECK_INTERVAL_S": "0.2",
        "PACSNODE__JOBS__POLL_INTERVAL_S": "0.5",
        "PACSNODE__DELIVERY__POLL_INTERVAL_S": "0.5",
        "PACSNODE__DESTINATIONS": json.dumps([{
            "name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
            "port": orthanc.dicom_port}]),
    })
    return env


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _wait_for_results(orthanc: Orthanc, study_uid: str, timeout: float) -> datetime:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = orthanc.modalities_of_study(study_uid)
        if counts.get("SEG") and counts.get("SR"):
            return datetime.now(timezone.utc)
        time.sleep(0.05)
    raise RuntimeError(f"no SEG and SR in Orthanc for {study_uid} after {timeout} s")


def _study(env: dict[str, str], uid: str) -> dict[str, Any]:
    result = subprocess.run([PYTHON, "-m", "node.cli", "study", uid, "--json"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(result.stdout))


def _steps(detail: dict[str, Any], in_orthanc: datetime) -> dict[str, float]:
    """Seconds spent in each step between stable and visible in Orthanc."""
    job = next(s["analysis"] for s in detail["series"] if s["analysis"]
               and s["analysis"]["status"] == "done")
    stable = _at(detail["stable_at"])
    sent = max(_at(d["sent_at"]) for r in job["results"] for d in r["deliveries"])
    steps = {"route and queue": (_at(job["queued_at"]) - stable).total_seconds(),
             "wait for a worker": (_at(job["started_at"]) - _at(job["queued_at"])).total_seconds()}
    steps.update({f"job: {k}": v for k, v in job["timings_s"].items() if k != "total"})
    steps["job: other"] = job["timings_s"]["total"] - sum(
        v for k, v in job["timings_s"].items() if k != "total")
    steps["job end to delivered"] = (sent - _at(job["finished_at"])).total_seconds()
    steps["delivered to listed by Orthanc"] = (in_orthanc - sent).total_seconds()
    steps["latency"] = (in_orthanc - stable).total_seconds()
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=200)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    sources = cached_series(args.slices)
    rounds_out: list[dict[str, float]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(dir=OUT) as tmp:
        folder = Path(tmp)
        rounds = prepare_rounds(sources, args.rounds, folder / "series")
        orthanc = Orthanc.start(folder / "orthanc")
        stack.callback(orthanc.stop)
        port = free_port()
        env = node_env(folder, port, orthanc)
        log = folder / "node.log"
        proc = stack.enter_context(running([PYTHON, "-m", "node.cli", "serve"], env, log))
        wait_for_port(port, proc, log)
        time.sleep(5)  # let the analysis worker finish importing before the first round
        for series in rounds:
            argv = ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(port),
                    *map(str, series.paths)]
            subprocess.run(argv, env=base_env(), check=True, capture_output=True, timeout=600)
            in_orthanc = _wait_for_results(orthanc, series.study_instance_uid, 300)
            time.sleep(1.0)  # let the node record the deliveries as sent
            steps = _steps(_study(env, series.study_instance_uid), in_orthanc)
            rounds_out.append(steps)
            print(f"round {series.index + 1}: stable -> SEG+SR in Orthanc {steps['latency']:.2f} s",
                  flush=True)
    print(f"\n{'step':<40} " + " ".join(f"{'round ' + str(i + 1):>9}" for i in range(len(rounds_out))))
    for step in rounds_out[0]:
        print(f"{step:<40} " + " ".join(f"{r.get(step, 0.0):9.2f}" for r in rounds_out))
    median = statistics.median(r["latency"] for r in rounds_out)
    print(f"\nmedian latency {median:.2f} s (target {TARGET_S:g} s): "
          f"{'met' if median <= TARGET_S else 'NOT met'}")
    (OUT / "e2e.json").write_text(json.dumps({
        "slices": args.slices, "rows": 512, "columns": 512, "target_s": TARGET_S,
        "median_latency_s": median, "rounds": rounds_out,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "when": datetime.now(timezone.utc).isoformat(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
