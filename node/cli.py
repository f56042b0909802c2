"""The ``pacsnode`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from node import __version__
from node.app import StartError
from node.cli_errors import CLIError
from node.config import ConfigError, Settings, load_settings

log = logging.getLogger("pacsnode")


def _engine(settings: Settings) -> Engine:
    from node.app import open_database

    return open_database(settings)


def _open_catalogue(settings: Settings) -> Engine:
    """The database of a node, at the schema this version reads (created if empty)."""
    from node.app import prepare_database

    engine = _engine(settings)
    prepare_database(engine)
    return engine


def _peer_defaults(settings: Settings, args: argparse.Namespace) -> Any:
    from node.dicom.scu import Peer

    host = args.host or ("127.0.0.1" if settings.node.host in ("0.0.0.0", "::") else settings.node.host)
    tls = _tls_options(args)
    # With TLS and no --port, this node's own TLS listener is the natural default.
    default_port = settings.node.tls.port if tls and settings.node.tls else settings.node.port
    return Peer(
        host=host,
        port=args.port or default_port,
        ae_title=args.called_ae or settings.node.ae_title,
        calling_ae=args.calling_ae,
        tls=tls,
    )


def _tls_options(args: argparse.Namespace) -> Any:
    """--tls-ca/--tls-cert/--tls-key as a ClientTLS, with their files checked now."""
    from node.config import ConfigError
    from node.dicom.tls import ClientTLS

    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise CLIError("--tls-cert/--tls-key need --tls-ca (the CA that signed the "
                           "peer's certificate)")
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together (our certificate and its key)")
    tls = ClientTLS(Path(args.tls_ca), args.tls_cert and Path(args.tls_cert),
                    args.tls_key and Path(args.tls_key), key="--tls")
    try:
        tls.context()
    except ConfigError as exc:
        raise CLIError(str(exc).replace("invalid configuration:\n  ", "")) from None
    return tls


# -- commands -----------------------------------------------------------------


def _check_routes_here(settings: Settings) -> None:
    """Routes name pipelines that exist, and configured models load and fit their cards,
    in this process (for the offline commands, which analyse in this process anyway)."""
    from node.app import check_pipelines

    if settings.models:
        from node.workflow.ml_models import check_models

        check_models(settings)
    check_pipelines(settings)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from node.app import Node

    node = Node(settings)
    stop, reload = threading.Event(), threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    node.start()
    # Wait with a timeout: a signal handler runs only when the main thread gets to
    # execute Python code, which an untimed wait may never give it.
    while not stop.wait(0.5):
        if reload.is_set():
            reload.clear()
            _reload(node, args)
    log.info("shutting down")
    node.drain()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from node.workflow.broker import KINDS
    from node.workflow.celery_worker import run_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues or any(q not in KINDS for q in queues):
        raise CLIError(f"--queues {args.queues!r}: give one or both of "
                       f"{', '.join(KINDS)}, comma-separated")
    run_worker(settings, args.concurrency or settings.jobs.workers, queues,
               settings.logging.level)
    return 0


def _reload(node: Any, args: argparse.Namespace) -> None:
    """SIGHUP: read the configuration again and apply what can change while running."""
    try:
        node.reload(load_settings(args.config))
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)


def cmd_echo(settings: Settings, args: argparse.Namespace) -> int:
    from node.dicom.scu import echo

    peer = _peer_defaults(settings, args)
    try:
        status = echo(peer)
    except ConnectionError as exc:
        raise CLIError(str(exc)) from None
    print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.dicom.scu import iter_files, send_files

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise CLIError(f"no such file or folder: {', '.join(missing)}")
    peer = _peer_defaults(settings, args)
    total = sum(1 for _ in iter_files(args.paths))
    with tqdm(total=total, unit="file", desc="sending", disable=args.quiet or None, file=sys.stderr) as bar:
        summary = send_files(args.paths, peer, lambda _path, _ok: bar.update(1))
    if args.json:
        print(json.dumps({
            "sent": summary.sent,
            "failed": len(summary.failures),
            "skipped": summary.skipped,
            "failures": [{"path": f.path, "reason": f.reason} for f in summary.failures],
        }, indent=2))
    else:
        print(f"{summary.sent} sent, {len(summary.failures)} failed "
              f"(to {peer.ae_title}@{peer.host}:{peer.port})")
        for skipped in summary.skipped:
            print(f"  skipped {skipped}: a DICOMDIR index, not an instance")
        for failure in summary.failures:
            print(f"  FAILED {failure.path}: {failure.reason}")
    return 0 if summary.ok else 1


def cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    from node.audit_queries import list_studies

    studies = list_studies(_open_catalogue(settings))
    if args.json:
        print(json.dumps(studies, indent=2))
        return 0
    if not studies:
        print("no studies")
        return 0
    print(f"{'STUDY INSTANCE UID':<64}  {'PATIENT ID':<16} {'STATUS':<10} {'SERIES':>6} {'INST':>6}  RECEIVED")
    for study in studies:
        print(
            f"{study['study_instance_uid']:<64}  {study['patient_id'][:16]:<16} "
            f"{study['status']:<10} {len(study['series']):>6} {study['instances']:>6}  "
            f"{study['received_at']}"
        )
    return 0


def cmd_rerun(settings: Settings, args: argparse.Namespace) -> int:
    from node.workflow.jobs import RerunError, queue_rerun

    try:
        queued = queue_rerun(_open_catalogue(settings), settings, args.study, args.series)
    except RerunError as exc:
        raise CLIError(str(exc)) from None
    what = f"series {args.series}" if args.series else f"study {args.study}"
    print(f"{what}: {len(queued)} job(s) queued ({', '.join(map(str, queued)) or 'none'}); "
          "the running node analyses them, and 'pacsnode study UID' shows the new results")
    return 0


def cmd_study(settings: Settings, args: argparse.Namespace) -> int:
    from node.audit_queries import study_detail

    detail = study_detail(_open_catalogue(settings), args.uid)
    if detail is None:
        raise CLIError(f"no study with Study Instance UID {args.uid} (see 'pacsnode studies')")
    if args.json:
        print(json.dumps(detail, indent=2))
        return 0
    print(f"Study {detail['study_instance_uid']}")
    print(f"  patient   {detail['patient_id']} {detail['patient_name']}")
    print(f"  status    {detail['status']} (stable at {detail['stable_at'] or '-'})")
    print(f"  received  {detail['received_at']} .. {detail['last_received_at']}")
    print(f"  instances {detail['instances']}")
    for series in detail["series"]:
        print(
            f"  series {series['series_number'] or '-':>4} {series['modality']:<4} "
            f"{series['instances']:>5} inst  {series['series_description']}  "
            f"{series['series_instance_uid']}"
        )
        analysis = series.get("analysis")
        if analysis:
            print(f"      {analysis['status']}: route {analysis['route'] or '-'}, pipeline "
                  f"{analysis['pipeline'] or '-'} {analysis['reason']}")
            for result in analysis["results"]:
                sent = ", ".join(f"{d['destination']} {d['status']} ({d['attempts']} tries)"
                                 for d in result["deliveries"])
                print(f"      {result['kind']:<7} {result['sop_instance_uid'] or result['file']}"
                      f"  {sent}")
    for event in detail["events"]:
        print(f"  {event['at']}  {event['from'] or '-'} -> {event['to']}: {event['reason']}")
    for assoc in detail["associations"]:
        print(
            f"  from {assoc['calling_ae']} ({assoc['peer']}) {assoc['started_at']}: "
            f"{assoc['instances_of_this_study']} instances, {assoc['outcome']}"
        )
    return 0


def cmd_analyze(settings: Settings, args: argparse.Namespace) -> int:
    from node.offline import analyze_paths

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise CLIError(f"no such file or folder: {', '.join(missing)}")
    if args.pipeline is not None:
        from analysis.pipeline import pipeline_names

        if args.pipeline not in pipeline_names():
            raise CLIError(f"no pipeline named {args.pipeline!r} "
                           f"(known: {', '.join(pipeline_names())})")
    else:
        _check_routes_here(settings)
    report = analyze_paths(args.paths, Path(args.out), settings, args.pipeline)
    print(json.dumps(report, indent=2))
    return 0 if all(s["status"] != "failed" for s in report["series"]) else 1


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from analysis import MODELS_DIR

    out = Path(args.out) if args.out else MODELS_DIR / args.task
    missing = [p for p in args.real if not Path(p.partition("=")[2] or p).exists()]
    if missing:
        raise CLIError(f"no such folder: {', '.join(missing)}")
    if args.task == "lungs":
        from analysis.training.lungs import train_lungs

        kwargs: dict[str, Any] = {"seed": args.seed, "real_folders": [Path(p) for p in args.real],
                                  "real_labels": args.real_labels}
        if args.real and args.real_labels == "reference":
            from analysis.corrections import CorrectionsError, training_corrections

            try:
                kwargs["corrections"] = training_corrections(
                    Path(args.corrections) if args.corrections else None)
            except CorrectionsError as exc:
                raise CLIError(f"--corrections: {exc}") from None
        if args.epochs is not None:
            kwargs["epochs"] = args.epochs
        if args.volumes is not None:
            kwargs["volumes"] = args.volumes
        card = train_lungs(out, **kwargs)
        print(json.dumps({"model": str(out), "metrics": card.to_dict().get("metrics")}, indent=2))
        return 0
    from analysis.training.region import train_region

    real = []
    for item in args.real:
        region, sep, folder = item.partition("=")
        if not sep:
            raise CLIError(f"--real {item!r}: for --task region give REGION=FOLDER")
        real.append((region, Path(folder)))
    kwargs = {"seed": args.seed, "classifier": args.classifier, "real": real}
    if args.real_data is not None:
        if not Path(args.real_data).is_dir():
            raise CLIError(f"--real-data {args.real_data}: no such folder")
        kwargs["real_root"] = Path(args.real_data)
    if args.per_region is not None:
        kwargs["per_region"] = args.per_region
    card = train_region(out, **kwargs)
    print(json.dumps({"model": str(out), "metrics": card.get("metrics")}, indent=2))
    if "real_leave_one_patient_out" in card.get("metrics", {}):
        from analysis.training.region_real import format_report

        print(format_report(card["metrics"]["real_leave_one_patient_out"]), file=sys.stderr)
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from node import evaluate

    try:
        labels = evaluate.load_region_labels(args.region, args.regions)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    known = [m.name for m in settings.models]
    if args.model and args.model not in known:
        raise CLIError(f"--model {args.model!r}: not in the configuration's models "
                       f"({', '.join(known) or 'none configured'})")
    if args.synthetic:
        scores = evaluate.evaluate_synthetic(settings, args.synthetic, args.seed, model=args.model)
    else:
        if not args.paths:
            raise CLIError("give folders of series to evaluate, or --synthetic N")
        missing = [p for p in args.paths if not Path(p).exists()]
        if missing:
            raise CLIError(f"no such file or folder: {', '.join(missing)}")
        missing = [p for p in args.reference if not Path(p).exists()]
        if missing:
            raise CLIError(f"--reference: no such file or folder: {', '.join(missing)}")
        scores = evaluate.evaluate_paths(args.paths, settings, regions=labels,
                                         references=args.reference, model=args.model)
    summary = evaluate.summarise(scores)
    if args.json:
        print(json.dumps({"series": [s.as_dict() for s in scores], "summary": summary}, indent=2))
        return 0
    print(evaluate.format_report(scores, summary))
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from db import migrate

    engine = _engine(settings)
    before, after = migrate.upgrade(engine)
    if before == after:
        print(f"database already at revision {after}")
    else:
        print(f"database upgraded from {before or 'empty'} to revision {after}")
    return 0


# -- parser -------------------------------------------------------------------


def _add_peer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="peer host (default: this node's host)")
    parser.add_argument("--port", type=int, help="peer port (default: node.port)")
    parser.add_argument("--called-ae", help="peer AE title (default: node.ae_title)")
    parser.add_argument("--calling-ae", default="PACSNODE_SCU", help="our AE title")
    parser.add_argument("--tls-ca", metavar="PEM", help="use DICOM TLS; the CA certificates "
                        "the peer's certificate must be signed by (default port: node.tls.port)")
    parser.add_argument("--tls-cert", metavar="PEM", help="our certificate, for a peer that "
                        "requires one (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsnode", description="DICOM-native PACS integration node."
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML configuration (default: $PACSNODE_CONFIG)"
    )
    # Sub-commands accept --config too; SUPPRESS keeps them from resetting a value
    # given before the sub-command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"pacsnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the DICOM node")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser(
        "worker", parents=[common],
        help="run analysis and delivery tasks from the broker (jobs.executor: celery)")
    worker.add_argument("--concurrency", type=int, default=0, metavar="N",
                        help="worker processes (default: jobs.workers)")
    worker.add_argument("--queues", default="analysis,delivery", metavar="KINDS",
                        help="analysis, delivery or both (default: both)")
    worker.set_defaults(func=cmd_worker)

    echo = commands.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    _add_peer_options(echo)
    echo.set_defaults(func=cmd_echo)

    send = commands.add_parser("send", parents=[common], help="C-STORE files and folders")
    send.add_argument("paths", nargs="+", metavar="PATH")
    _add_peer_options(send)
    send.add_argument("--json", action="store_true", help="print the summary as JSON")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    studies = commands.add_parser("studies", parents=[common], help="list received studies")
    studies.add_argument("--json", action="store_true")
    studies.set_defaults(func=cmd_studies)

    study = commands.add_parser("study", parents=[common], help="show one study")
    study.add_argument("uid", metavar="UID")
    study.add_argument("--json", action="store_true")
    study.set_defaults(func=cmd_study)

    rerun = commands.add_parser("rerun", parents=[common],
                                help="analyse a study (or one series) again")
    rerun.add_argument("--study", required=True, metavar="UID")
    rerun.add_argument("--series", metavar="UID", help="only this series of the study")
    rerun.set_defaults(func=cmd_rerun)

    analyze = commands.add_parser(
        "analyze", parents=[common],
        help="analyse files and folders offline: SEG, SR and preview per series",
    )
    analyze.add_argument("paths", nargs="+", metavar="PATH")
    analyze.add_argument("--out", required=True, metavar="DIR", help="where results go")
    analyze.add_argument("--pipeline", help="run this pipeline on every image series "
                         "instead of routing them by the configured routes")
    analyze.set_defaults(func=cmd_analyze)

    train = commands.add_parser(
        "train", parents=[common],
        help="train a shipped model on generated data (and optional real folders)")
    train.add_argument("--task", required=True, choices=["lungs", "region"])
    train.add_argument("--out", metavar="DIR",
                       help="where the model and its card go (default: the shipped model's folder)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--real", action="append", default=[], metavar="FOLDER",
                       help="real CT folder to add (lungs: FOLDER, labelled as --real-labels "
                       "says; region: REGION=FOLDER); repeatable")
    train.add_argument("--real-labels", choices=["reference", "classical"], default="reference",
                       help="lungs: label real folders by the reference procedure with the "
                       "hand-checked corrections (the masks `pacsnode reference` writes) or "
                       "by the classical pipeline")
    train.add_argument("--corrections", metavar="FILE|DIR",
                       help="lungs: corrections of the references (default: "
                       "analysis/reference_corrections)")
    train.add_argument("--epochs", type=int, help="lungs: training epochs")
    train.add_argument("--volumes", type=int, help="lungs: generated training volumes")
    train.add_argument("--classifier", choices=["et", "rf", "svm"], default="et",
                       help="region: extremely randomized trees (the shipped model), "
                       "random forest or support vector machine")
    train.add_argument("--per-region", type=int, help="region: generated series per region")
    train.add_argument("--real-data", metavar="DIR",
                       help="region: the real series of analysis/training/region_real.py "
                            "under DIR (../shared/data), trained on and evaluated "
                            "leave-one-patient-out")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", parents=[common],
        help="Dice per structure and region accuracy on series with known answers")
    evaluate.add_argument("paths", nargs="*", metavar="PATH",
                          help="folders with CT series and reference SEGs")
    evaluate.add_argument("--region", action="append", default=[], metavar="REGION=PATH",
                          help="every series under PATH is of REGION (repeatable)")
    evaluate.add_argument("--regions", metavar="FILE",
                          help="JSON: Series Instance UID or path -> region")
    evaluate.add_argument("--reference", action="append", default=[], metavar="SEG|DIR",
                          help="reference SEGs stored apart from the images, e.g. from "
                               "'pacsnode reference' (repeatable)")
    evaluate.add_argument("--synthetic", type=int, metavar="N",
                          help="evaluate on N generated series per region held back from training")
    evaluate.add_argument("--model", metavar="NAME",
                          help="a model of the configuration's models: in place of the "
                               "shipped U-Net (e.g. one trained with pacsnode train --out)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    from node.cli_deliveries import add_commands

    add_commands(commands, common, _open_catalogue, CLIError)

    db = commands.add_parser("db", parents=[common], help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", parents=[common], help="apply migrations")
    upgrade.set_defaults(func=cmd_db_upgrade)

    from node.cli_web import add_commands

    add_commands(commands, common)

    from node.cli_reference import add_commands as add_reference

    add_reference(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        logging.basicConfig(
            level=settings.logging.level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        if settings.logging.level != "DEBUG":
            logging.getLogger("alembic").setLevel(logging.WARNING)
            # pynetdicom logs every PDU at INFO; client commands report failures themselves.
            quiet = logging.WARNING if args.command in ("serve", "web", "worker") \
                else logging.CRITICAL
            logging.getLogger("pynetdicom").setLevel(quiet)
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return 2
    except (CLIError, StartError) as exc:
        print(f"pacsnode: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"pacsnode: database error: {reason} (check database.url)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
