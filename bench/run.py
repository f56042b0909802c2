"""Ingest benchmark: C-STORE one CT series into DCMTK storescp, Orthanc and this node.

Run with ``make bench`` (``.venv/bin/python bench/run.py``). It

1. generates, once, a synthetic 200-slice 512x512 CT (about 100 MB) in
   ``bench/out/ct200/``;
2. makes one copy of that series per round with fresh Study/Series/SOP Instance UIDs,
   so that every receiver stores new instances in every round (no duplicates);
3. starts the three receivers on free loopback ports, each in its own temporary folder;
4. sends each round's copy with one ``storescu`` association to each receiver in turn,
   timing the ``storescu`` run, and checks every receiver holds what was sent;
5. prints a table and writes ``bench/out/ingest.json``.

Before each timed send the page cache is flushed with ``sync()`` so that no receiver
pays for the write-back of another's files. ``TCP_NODELAY=1`` is set for every
process (DCMTK stalls on Nagle's algorithm otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.phantoms.dicom_series import write_ct_series  # noqa: E402
from analysis.phantoms.trunk import PhantomSpec, make_phantom  # noqa: E402
from tests.orthanc import free_ports, orthanc_config  # noqa: E402

OUT = ROOT / "bench" / "out"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
ROWS = COLUMNS = 512
PIXEL_SPACING_MM = 0.75
START_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 600.0
BASE_RECEIVER = "storescp"


# -- the series ---------------------------------------------------------------


@dataclass(frozen=True)
class RoundSeries:
    """One round's copy of the series: its own UIDs, the same pixels."""

    index: int
    study_instance_uid: str
    paths: list[Path]


def cached_series(slices: int) -> list[Path]:
    """The synthetic CT in ``bench/out/ct<slices>/``, generated on first use."""
    folder = OUT / f"ct{slices}"
    marker = folder / "complete.json"
    if marker.is_file():
        return sorted(folder.glob("CT*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating a {slices}-slice {ROWS}x{COLUMNS} CT in {folder} ...", flush=True)
    spec = PhantomSpec(slices=slices, rows=ROWS, columns=COLUMNS, pixel_spacing_mm=PIXEL_SPACING_MM)
    info = write_ct_series(make_phantom(spec), folder)
    marker.write_text(json.dumps({"study_instance_uid": info.study_instance_uid}))
    return list(info.paths)


def prepare_rounds(sources: list[Path], rounds: int, folder: Path) -> list[RoundSeries]:
    """Write one copy of the series per round with new study, series and SOP UIDs."""
    datasets = [pydicom.dcmread(path) for path in sources]
    return [_rewrite(datasets, folder / f"round{index}", index) for index in range(rounds)]


def _rewrite(datasets: list[pydicom.Dataset], folder: Path, index: int) -> RoundSeries:
    folder.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"CT{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return RoundSeries(index, study_uid, paths)


# -- processes ----------------------------------------------------------------


def free_port() -> int:
    return free_ports(1)[0]


def base_env() -> dict[str, str]:
    """This environment without any pacsnode settings, plus TCP_NODELAY=1."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSNODE")}
    env["TCP_NODELAY"] = "1"
    return env


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {START_TIMEOUT_S} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A background process that is terminated (then killed) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- receivers ----------------------------------------------------------------


@dataclass
class Receiver:
    """A running C-STORE SCP and how to check what it holds."""

    name: str
    ae_title: str
    port: int
    verify: Callable[[RoundSeries, int], str]  # (round, rounds so far) -> "" or a problem
    seconds: list[float] = field(default_factory=list)
    #: storescu's TLS options for this receiver (empty: plain TCP)
    tls_options: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        """The DCMTK receiver it is compared with: storescp over the same transport."""
        return BASE_RECEIVER + ("-tls" if self.tls_options else "")


def start_storescp(stack: ExitStack, folder: Path, pki: Path | None = None) -> Receiver:
    name = "storescp-tls" if pki else "storescp"
    port, data = free_port(), folder / name
    data.mkdir()
    log = folder / f"{name}.log"
    tls = ["+tls", str(pki / "node.key"), str(pki / "node.pem"), "+cf", str(pki / "ca.pem"),
           "--require-peer-cert"] if pki else []
    argv = ["storescp", *tls, "-aet", "STORESCP", "--output-directory", str(data), str(port)]
    wait_for_port(port, stack.enter_context(running(argv, base_env(), log)), log)

    def verify(series: RoundSeries, done: int) -> str:
        count = sum(1 for _ in data.iterdir())
        expected = done * len(series.paths)
        return "" if count == expected else f"storescp holds {count} files, expected {expected}"

    return Receiver(name, "STORESCP", port, verify, tls_options=_client_tls(pki))


def _client_tls(pki: Path | None) -> list[str]:
    if pki is None:
        return []
    return ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]


def make_pki(folder: Path) -> Path:
    """A test CA with node and client certificates, by the scripts the README gives."""
    scripts = ROOT / "deploy" / "tls"
    subprocess.run([str(scripts / "make-ca.sh"), str(folder)], check=True, capture_output=True)
    for name in ("node", "client"):
        subprocess.run([str(scripts / "make-cert.sh"), str(folder), name], check=True,
                       capture_output=True)
    return folder


def start_orthanc(stack: ExitStack, folder: Path) -> Receiver:
    http_port, dicom_port = free_ports(2)
    home = folder / "orthanc"
    home.mkdir()
    config = home / "config.json"
    config.write_text(json.dumps(orthanc_config(home, http_port, dicom_port, "ORTHANC"), indent=2))
    log = home / "orthanc.log"
    proc = stack.enter_context(running(["Orthanc", str(config)], base_env(), log))
    wait_for_port(http_port, proc, log)
    wait_for_port(dicom_port, proc, log)

    def verify(series: RoundSeries, done: int) -> str:
        url = f"http://127.0.0.1:{http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            count = int(json.load(response)["CountInstances"])
        expected = done * len(series.paths)
        return "" if count == expected else f"Orthanc holds {count} instances, expected {expected}"

    return Receiver("orthanc", "ORTHANC", dicom_port, verify)


def node_env(folder: Path, port: int, max_pdu: int | None,
             pki: Path | None = None, tls_port: int = 0) -> dict[str, str]:
    env = base_env()
    env.update(
        {
            "PACSNODE__NODE__HOST": "127.0.0.1",
            "PACSNODE__NODE__PORT": str(port),
            "PACSNODE__NODE__AE_TITLE": "PACSNODE",
            "PACSNODE__STORAGE__DATA_DIR": str(folder / "var"),
            # No study becomes stable during the bench, so no extra work competes.
            "PACSNODE__STUDY__STABLE_AGE_S": "3600",
            # Two nodes run side by side; neither needs the web application.
            "PACSNODE__WEB__ENABLED": "false",
        }
    )
    if max_pdu is not None:
        env["PACSNODE__NODE__MAX_PDU"] = str(max_pdu)
    if pki is not None:
        env.update({
            "PACSNODE__NODE__TLS__PORT": str(tls_port),
            "PACSNODE__NODE__TLS__CERTIFICATE": str(pki / "node.pem"),
            "PACSNODE__NODE__TLS__PRIVATE_KEY": str(pki / "node.key"),
            "PACSNODE__NODE__TLS__CA_CERTIFICATES": str(pki / "ca.pem"),
        })
    return env


def start_node(stack: ExitStack, folder: Path, max_pdu: int | None,
               pki: Path | None = None) -> Receiver:
    name = "node-tls" if pki else "node"
    port, tls_port = free_ports(2)
    home = folder / name
    home.mkdir()
    env, log = node_env(home, port, max_pdu, pki, tls_port), home / "node.log"
    argv = [PYTHON, "-m", "node.cli", "serve"]
    proc = stack.enter_context(running(argv, env, log))
    wait_for_port(port, proc, log)
    if pki:
        wait_for_port(tls_port, proc, log)

    def verify(series: RoundSeries, done: int) -> str:
        result = subprocess.run(
            [PYTHON, "-m", "node.cli", "studies", "--json"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )
        counts = {s["study_instance_uid"]: s["instances"] for s in json.loads(result.stdout)}
        count = counts.get(series.study_instance_uid, 0)
        if count != len(series.paths):
            return f"the node holds {count} instances of the round's study, expected {len(series.paths)}"
        return ""

    return Receiver(name, "PACSNODE", tls_port if pki else port, verify,
                    tls_options=_client_tls(pki))


# -- sending ------------------------------------------------------------------


def send(receiver: Receiver, series: RoundSeries) -> float:
    """One storescu association with the whole series; the wall time in seconds."""
    argv = ["storescu", *receiver.tls_options, "-aec", receiver.ae_title, "127.0.0.1",
            str(receiver.port)]
    argv += [str(path) for path in series.paths]
    os.sync()  # nobody pays for the write-back of a previous receiver's files
    start = time.perf_counter()
    result = subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=SEND_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"storescu to {receiver.name} exited with {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return elapsed


def run_rounds(receivers: list[Receiver], rounds: list[RoundSeries]) -> None:
    for series in rounds:
        for receiver in receivers:
            seconds = send(receiver, series)
            problem = receiver.verify(series, series.index + 1)
            if problem:
                raise RuntimeError(f"round {series.index + 1}: {problem}")
            receiver.seconds.append(seconds)
            rate = len(series.paths) / seconds
            print(f"  round {series.index + 1}  {receiver.name:<12} {seconds:7.2f} s  {rate:7.1f} inst/s",
                  flush=True)


# -- results ------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    receiver: str
    seconds: list[float]
    median_s: float
    min_s: float
    max_s: float
    median_instances_per_s: float
    #: median of the per-round instances/s ratios to storescp over the same transport
    ratio_to_storescp: float | None


def summarise(receivers: list[Receiver], instances: int) -> list[Summary]:
    summaries = []
    for receiver in receivers:
        base = next((r for r in receivers if r.name == receiver.base), None)
        ratio = None
        if base is not None:
            # instances/s ratio = inverse time ratio, round by round
            ratio = statistics.median(b / s for b, s in zip(base.seconds, receiver.seconds))
        median_s = statistics.median(receiver.seconds)
        summaries.append(
            Summary(
                receiver=receiver.name,
                seconds=[round(s, 4) for s in receiver.seconds],
                median_s=round(median_s, 4),
                min_s=round(min(receiver.seconds), 4),
                max_s=round(max(receiver.seconds), 4),
                median_instances_per_s=round(instances / median_s, 2),
                ratio_to_storescp=None if ratio is None else round(ratio, 3),
            )
        )
    return summaries


def print_table(summaries: list[Summary], instances: int, megabytes: float) -> None:
    print(f"\n{instances} instances ({megabytes:.1f} MB) per round, one association, loopback")
    print(f"{'receiver':<13} {'median s':>9} {'inst/s':>8} {'MB/s':>7} {'min s':>7} {'max s':>7} "
          f"{'x storescp':>11}")
    for s in summaries:
        ratio = "-" if s.ratio_to_storescp is None else f"{s.ratio_to_storescp:.2f}"
        print(f"{s.receiver:<13} {s.median_s:>9.2f} {s.median_instances_per_s:>8.1f} "
              f"{megabytes / s.median_s:>7.1f} {s.min_s:>7.2f} {s.max_s:>7.2f} {ratio:>11}")


def tool_version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "not found"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def environment() -> dict[str, Any]:
    import pynetdicom

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "storescu": tool_version(["storescu", "--version"]),
        "orthanc": tool_version(["Orthanc", "--version"]),
        "tcp_nodelay": "1",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, summaries: list[Summary], args: argparse.Namespace, megabytes: float) -> None:
    report = {
        "benchmark": "ingest",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "instances_per_round": args.slices,
        "megabytes_per_round": round(megabytes, 2),
        "image": {"rows": ROWS, "columns": COLUMNS, "transfer_syntax": "Explicit VR Little Endian"},
        "sender": "storescu, one association, default options (+tls for the -tls receivers)",
        "node_max_pdu": args.node_max_pdu,
        "environment": environment(),
        "receivers": [asdict(s) for s in summaries],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# -- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="C-STORE ingest benchmark: storescp, Orthanc, this node.")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per receiver (default 5)")
    parser.add_argument("--slices", type=int, default=200, help="instances per round (default 200)")
    parser.add_argument("--skip-orthanc", action="store_true", help="benchmark storescp and the node only")
    parser.add_argument(
        "--node-max-pdu", type=int, metavar="BYTES",
        help="the node's node.max_pdu (default: its configured default, 262144; "
        "storescp and Orthanc accept 16384)",
    )
    parser.add_argument("--tls", action="store_true",
                        help="also storescp and the node over DICOM TLS (storescu +tls)")
    parser.add_argument("--output", type=Path, default=OUT / "ingest.json", help="JSON results file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.slices < 1:
        parser.error("--rounds and --slices must be at least 1")
    return args


def start_receivers(stack: ExitStack, folder: Path, args: argparse.Namespace) -> list[Receiver]:
    receivers = [start_storescp(stack, folder)]
    if not args.skip_orthanc:
        receivers.append(start_orthanc(stack, folder))
    receivers.append(start_node(stack, folder, args.node_max_pdu))
    if args.tls:
        pki = make_pki(folder / "pki")
        receivers.append(start_storescp(stack, folder, pki))
        receivers.append(start_node(stack, folder, args.node_max_pdu, pki))
    return receivers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = cached_series(args.slices)
    megabytes = sum(p.stat().st_size for p in sources) / 1e6
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pacsnode-bench-")))
        print(f"preparing {args.rounds} copies of the series with fresh UIDs ...", flush=True)
        rounds = prepare_rounds(sources, args.rounds, work / "rounds")
        receivers = start_receivers(stack, work, args)
        print("receivers: " + ", ".join(f"{r.name} ({r.ae_title}@127.0.0.1:{r.port})" for r in receivers))
        run_rounds(receivers, rounds)
    summaries = summarise(receivers, args.slices)
    print_table(summaries, args.slices, megabytes)
    write_json(args.output, summaries, args, megabytes)
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
