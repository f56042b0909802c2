"""The outbox during a PACS outage: attempts, recovery time, no duplicates.

Run with ``.venv/bin/python bench/outage.py [--minutes 10] [--studies 5]``. It starts
a real Orthanc and the node (default route: CT -> ``ct-body-lungs`` -> Orthanc; the
``delivery`` settings at their defaults unless given with ``--set KEY=VALUE``), sends
one study and waits for its results in Orthanc (the baseline), then stops Orthanc for
``--minutes`` while ``--studies`` more studies arrive at even intervals, and starts it
again on the same storage and ports. It polls the node's database every second for the
destination's circuit, waits until every delivery is ``sent``, and reports

* the attempts made: per delivery, the probes among them, and how many of each were
  made while Orthanc was down;
* the circuit's course: when it opened, its probes, when it closed;
* when each result was delivered, in seconds after Orthanc came back;
* duplicates: Orthanc must hold each result's SOP Instance exactly once, and nothing
  else in those studies but the node's results and the images sent.

Results are printed and written to ``bench/out/outage.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, PYTHON, base_env, free_port, running, wait_for_port  # noqa: E402

from analysis.phantoms.dicom_series import write_ct_series  # noqa: E402
from analysis.phantoms.trunk import PhantomSpec, make_phantom  # noqa: E402
from tests.orthanc import Orthanc, free_ports  # noqa: E402

SPEC = dict(slices=24, rows=128, columns=128, pixel_spacing_mm=3.0)


def node_env(folder: Path, port: int, orthanc_port: int, settings: list[str]) -> dict[str, str]:
    env = base_env()
    env.update({
        "PACSNODE__NODE__HOST": "127.0.0.1",
        "PACSNODE__NODE__PORT": str(port),
        "PACSNODE__STORAGE__DATA_DIR": str(folder / "var"),
        "PACSNODE__STUDY__STABLE_AGE_S": "2",
        "PACSNODE__STUDY__CHECK_INTERVAL_S": "0.5",
        "PACSNODE__DESTINATIONS": json.dumps([{
            "name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
            "port": orthanc_port}]),
    })
    for item in settings:
        key, _, value = item.partition("=")
        env["PACSNODE__" + key.upper().replace(".", "__")] = value
    return env


def _db(folder: Path) -> Any:
    from sqlalchemy import create_engine

    return create_engine(f"sqlite:///{folder / 'var' / 'pacsnode.db'}")


def _rows(engine: Any, sql: str) -> list[dict[str, Any]]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(sql))]


def send_study(port: int, folder: Path, seed: int) -> str:
    series = write_ct_series(make_phantom(PhantomSpec(**SPEC, seed=seed)), folder)
    subprocess.run(["storescu", "-aec", "PACSNODE", "127.0.0.1", str(port),
                    *map(str, series.paths)], env=base_env(), check=True,
                   capture_output=True, timeout=300)
    return series.study_instance_uid


class Watch:
    """The destination's circuit, sampled once a second."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.course: list[dict[str, Any]] = []

    def sample(self, t0: float) -> None:
        rows = _rows(self.engine, "SELECT state, consecutive_failures FROM destination_states")
        if not rows:
            return
        state = rows[0]
        if not self.course or self.course[-1]["state"] != state["state"]:
            self.course.append({"t_s": round(time.monotonic() - t0, 1), **state})


def wait_delivered(engine: Any, watch: Watch, t0: float, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watch.sample(t0)
        sent = _rows(engine, "SELECT count(*) AS n FROM deliveries WHERE status = 'sent'")
        if sent[0]["n"] >= expected:
            return
        time.sleep(1.0)
    raise RuntimeError(f"not every delivery was sent within {timeout:.0f} s")


def collect(engine: Any, down_at: datetime, up_at: datetime) -> list[dict[str, Any]]:
    """Per delivery: attempts, probes, attempts while down, seconds after the return."""
    found = []
    for item in _rows(engine, "SELECT d.id, d.attempts, d.sent_at, d.created_at, r.kind, "
                      "r.sop_instance_uid FROM deliveries d JOIN results r "
                      "ON r.id = d.result_fk ORDER BY d.id"):
        events = _rows(engine, "SELECT at, reason FROM delivery_events WHERE delivery_fk = "
                       f"{int(item['id'])} AND to_status = 'sending'")
        times = [_aware(e["at"]) for e in events]
        sent = _aware(item["sent_at"])
        found.append({
            "id": item["id"], "kind": item["kind"], "sop_instance_uid": item["sop_instance_uid"],
            "created_s": round((_aware(item["created_at"]) - down_at).total_seconds(), 1),
            "attempts": item["attempts"],
            "probes": sum("(probe)" in e["reason"] for e in events),
            "attempts_while_down": sum(down_at <= t < up_at for t in times),
            "delivered_after_return_s": round((sent - up_at).total_seconds(), 1),
        })
    return found


def _aware(value: Any) -> datetime:
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def duplicates(orthanc: Orthanc, studies: list[str], results: list[dict[str, Any]]) -> dict[str, Any]:
    """What Orthanc holds of the node's result series, against what the node made."""
    held: list[str] = []
    for study in studies:
        for series in orthanc.series_of_study(study):
            if series["MainDicomTags"].get("Modality") in ("SEG", "SR"):
                for instance in series["Instances"]:
                    held.append(orthanc.get(f"/instances/{instance}/simplified-tags")
                                ["SOPInstanceUID"])
    made = sorted(r["sop_instance_uid"] for r in results)
    return {"results_made": len(made), "result_instances_in_orthanc": len(held),
            "each_once": sorted(held) == made}


def run(args: argparse.Namespace, folder: Path, stack: ExitStack) -> dict[str, Any]:
    http_port, dicom_port = free_ports(2)
    orthanc = Orthanc.start(folder / "orthanc", ports=(http_port, dicom_port))
    stack.callback(lambda: orthanc.stop())
    port = free_port()
    log = folder / "node.log"
    proc = stack.enter_context(running([PYTHON, "-m", "node.cli", "serve"],
                                       node_env(folder, port, dicom_port, args.set), log))
    wait_for_port(port, proc, log)
    engine = _db(folder)
    watch, t0 = Watch(engine), time.monotonic()
    studies = [send_study(port, folder / "ct-0", 0)]
    wait_delivered(engine, watch, t0, 2, 300)
    print("baseline study delivered; stopping Orthanc", flush=True)
    orthanc.stop()
    down_at, down_t = datetime.now(timezone.utc), time.monotonic()
    outage_s = args.minutes * 60
    for number in range(1, args.studies + 1):
        send_at = down_t + outage_s * number / (args.studies + 1)
        while time.monotonic() < send_at:
            watch.sample(t0)
            time.sleep(1.0)
        studies.append(send_study(port, folder / f"ct-{number}", number))
        print(f"  study {number} sent at {time.monotonic() - down_t:.0f} s into the outage",
              flush=True)
    while time.monotonic() < down_t + outage_s:
        watch.sample(t0)
        time.sleep(1.0)
    orthanc = Orthanc.start(folder / "orthanc", ports=(http_port, dicom_port))
    up_at = datetime.now(timezone.utc)
    print("Orthanc is back", flush=True)
    wait_delivered(engine, watch, t0, 2 * len(studies), 3600)
    results = collect(engine, down_at, up_at)
    return {"minutes": args.minutes, "studies_during_outage": args.studies,
            "settings": args.set, "deliveries": results, "circuit": watch.course,
            "outage_started_s": round(down_t - t0, 1),
            "duplicates": duplicates(orthanc, studies, results)}


def report(out: dict[str, Any]) -> None:
    print(f"\noutage of {out['minutes']:g} min, {out['studies_during_outage']} studies during it")
    print(f"{'delivery':>8} {'kind':<4} {'queued (s into outage)':>22} {'attempts':>8} "
          f"{'while down':>10} {'probes':>6} {'delivered after return (s)':>27}")
    for item in out["deliveries"]:
        print(f"{item['id']:>8} {item['kind']:<4} {item['created_s']:>22.1f} "
              f"{item['attempts']:>8} {item['attempts_while_down']:>10} {item['probes']:>6} "
              f"{item['delivered_after_return_s']:>27.1f}")
    down = [d for d in out["deliveries"] if d["attempts_while_down"]]
    print(f"attempts while down: {sum(d['attempts_while_down'] for d in out['deliveries'])} "
          f"(of {len(down)} deliveries), probes {sum(d['probes'] for d in out['deliveries'])}")
    print("circuit:", ", ".join(f"{c['state']} at {c['t_s'] - out['outage_started_s']:.0f} s"
                                for c in out["circuit"]))
    print("duplicates:", out["duplicates"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the outage")
    parser.add_argument("--studies", type=int, default=5,
                        help="studies that arrive during the outage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a node setting, e.g. delivery.retry_max_s=120 (repeatable)")
    parser.add_argument("--output", type=Path, default=OUT / "outage.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp, ExitStack() as stack:
        out = run(args, Path(tmp), stack)
    out["machine"] = {"python": platform.python_version(), "when":
                      datetime.now(timezone.utc).isoformat()}
    report(out)
    args.output.write_text(json.dumps(out, indent=2))
    return 0 if out["duplicates"]["each_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
