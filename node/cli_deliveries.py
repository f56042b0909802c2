"""``pacsnode deliveries`` and ``pacsnode resend``: the outbox for operators.

Registered by :func:`node.cli.build_parser` with :func:`add_commands`, which is given
what the commands share with the rest of the command line (how to open the database,
the error class printed without a traceback) rather than importing :mod:`node.cli`,
which runs as ``__main__``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from db.tables import DeliveryStatus
from node.config import Settings

STATUSES = [status.value for status in DeliveryStatus]


def add_commands(commands: Any, common: argparse.ArgumentParser,
                 open_catalogue: Callable[[Settings], Engine],
                 error: type[Exception]) -> None:
    """Add ``deliveries`` and ``resend`` to the sub-commands ``commands``."""
    listing = commands.add_parser(
        "deliveries", parents=[common],
        help="list deliveries of results to destinations, and each destination's circuit")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--destination", metavar="NAME")
    listing.add_argument("--study", metavar="UID", help="only this study's deliveries")
    listing.add_argument("--limit", type=int, default=500,
                         help="newest N deliveries (default 500; 0: all)")
    listing.add_argument("--history", action="store_true",
                         help="with every change of each delivery and its reason")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=lambda settings, args: cmd_deliveries(
        open_catalogue(settings), args))

    resend = commands.add_parser(
        "resend", parents=[common],
        help="send deliveries again now (failed ones, say), attempts reset")
    resend.add_argument("ids", nargs="*", type=int, metavar="DELIVERY_ID")
    resend.add_argument("--study", metavar="UID", help="every delivery of this study")
    resend.add_argument("--destination", metavar="NAME",
                        help="every delivery to this destination (with --status: those)")
    resend.add_argument("--status", choices=STATUSES,
                        help="only deliveries with this status (e.g. failed)")
    resend.add_argument("--reason", default="", help="recorded with the resend, for audit")
    resend.set_defaults(func=lambda settings, args: cmd_resend(
        settings, open_catalogue(settings), args, error))


def cmd_deliveries(engine: Engine, args: argparse.Namespace) -> int:
    from node.delivery_queries import circuits, list_deliveries

    found = list_deliveries(engine, args.status, args.destination, args.study, args.limit,
                            args.history)
    states = circuits(engine)
    if args.json:
        print(json.dumps({"destinations": states, "deliveries": found}, indent=2))
        return 0
    for state in states:
        extra = (f", next probe {state['next_probe_at']}" if state["state"] != "closed"
                 else "")
        print(f"destination {state['name']}: circuit {state['state']} "
              f"({state['consecutive_failures']} failures in a row{extra})"
              f"{'  ' + state['last_error'] if state['last_error'] else ''}")
    if not found:
        print("no deliveries")
        return 0
    print(f"{'ID':>6} {'STUDY INSTANCE UID':<40} {'KIND':<4} {'SOP INSTANCE UID':<40} "
          f"{'DESTINATION':<12} {'STATUS':<19} {'TRIES':>5} {'NEXT ATTEMPT':<25} "
          f"{'CIRCUIT':<9} LAST ERROR")
    for item in found:
        print(f"{item['id']:>6} {_cut(item['study_instance_uid'], 40):<40} "
              f"{item['kind']:<4} {_cut(item['sop_instance_uid'] or '-', 40):<40} "
              f"{_cut(item['destination'], 12):<12} {item['status']:<19} "
              f"{item['attempts']:>5} {item['next_attempt_at'] or '-':<25} "
              f"{item['circuit'] or '-':<9} {item['last_error']}")
        for event in item.get("events", []):
            print(f"{'':>8}{event['at']}  {event['from'] or '-'} -> {event['to']}: "
                  f"{event['reason']}")
    return 0


def _cut(text: str, width: int) -> str:
    """UIDs are up to 64 characters: the table keeps their informative tail."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def cmd_resend(settings: Settings, engine: Engine, args: argparse.Namespace,
               error: type[Exception]) -> int:
    from db.tables import utcnow
    from node.workflow.outbox import ResendError, resend

    _check_selector(settings, args, error)
    try:
        resent, busy = resend(engine, utcnow(), ids=args.ids, study_uid=args.study,
                              destination=args.destination, status=args.status,
                              reason=args.reason)
    except ResendError as exc:
        raise error(str(exc)) from None
    print(f"{len(resent)} deliveries queued to be sent again now"
          f"{': ' + ', '.join(map(str, resent)) if resent else ''}")
    if busy:
        print(f"{len(busy)} are being sent right now and were left as they are: "
              f"{', '.join(map(str, busy))}")
    return 0


def _check_selector(settings: Settings, args: argparse.Namespace,
                    error: type[Exception]) -> None:
    """Exactly one way of choosing deliveries, so a bare ``resend`` resends nothing."""
    chosen = [name for name, given in (("DELIVERY_ID", args.ids), ("--study", args.study),
                                       ("--destination", args.destination)) if given]
    if not chosen:
        raise error("say which deliveries to resend: DELIVERY_ID..., --study UID, or "
                    "--destination NAME [--status failed] (see 'pacsnode deliveries')")
    if len(chosen) > 1:
        raise error(f"give one of DELIVERY_ID..., --study, --destination (got "
                    f"{' and '.join(chosen)})")
    known = [dest.name for dest in settings.destinations]
    if args.destination is not None and args.destination not in known:
        # Its deliveries could not be sent anyway: nothing would take them.
        raise error(f"no destination named {args.destination!r} is configured "
                    f"(destinations: {', '.join(known) or 'none'})")
