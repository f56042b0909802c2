"""``pacsnode reference``: reference lung masks as DICOM SEG (see :mod:`node.reference`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from node.cli_errors import CLIError
from node.config import Settings


def cmd_reference(settings: Settings, args: argparse.Namespace) -> int:
    """Write one reference SEG per image series under the paths."""
    from analysis.corrections import CorrectionsError, load_corrections
    from node.offline import read_folder
    from node.reference import reference_for_series
    from node.workflow.analyze import dataset_bytes
    from node.workflow.routing import facts_from_datasets, never_analysed

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise CLIError(f"no such file or folder: {', '.join(missing)}")
    corrections = {}
    if args.corrections:
        if not Path(args.corrections).exists():
            raise CLIError(f"--corrections {args.corrections}: no such file or folder")
        try:
            corrections = load_corrections(Path(args.corrections))
        except CorrectionsError as exc:
            raise CLIError(str(exc)) from None
    by_series, _ = read_folder(args.paths)
    images = {uid: d for uid, d in by_series.items()
              if not never_analysed(facts_from_datasets(uid, d))}
    if not images:
        raise CLIError(f"no image series found under {', '.join(args.paths)}")
    if args.corrections and Path(args.corrections).is_file():
        unmatched = sorted(set(corrections) - set(images))
        if unmatched:
            raise CLIError(f"--corrections {args.corrections}: for series {unmatched[0]}, "
                           "which is not among the image series given")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: list[dict[str, Any]] = []
    for uid, datasets in images.items():
        outcome = reference_for_series(datasets, corrections.get(uid))
        item: dict[str, Any] = {"series_instance_uid": uid, "status": outcome.status,
                                "reason": outcome.reason, "volumes_ml": outcome.volumes_ml,
                                "notes": outcome.notes,
                                "corrections": corrections[uid].source if uid in corrections
                                else None}
        if outcome.seg is not None:
            target = out / f"{uid}.reference-seg.dcm"
            target.write_bytes(dataset_bytes(outcome.seg))
            item["seg"] = str(target)
        report.append(item)
    print(json.dumps({"series": report}, indent=2))
    return 0 if all(r["status"] != "failed" for r in report) else 1


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register ``reference`` on the ``pacsnode`` parser."""
    reference = commands.add_parser(
        "reference", parents=[common],
        help="reference lung masks (threshold procedure + hand-checked corrections) as SEG")
    reference.add_argument("paths", nargs="+", metavar="PATH")
    reference.add_argument("--task", required=True, choices=["lungs"])
    reference.add_argument("--out", required=True, metavar="DIR", help="where the SEGs go")
    reference.add_argument("--corrections", metavar="FILE|DIR",
                           help="a corrections JSON file, or a folder of them "
                                "(analysis/reference_corrections)")
    reference.set_defaults(func=cmd_reference)
