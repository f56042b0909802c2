"""``pacsnode web``, ``pacsnode user ...`` and ``pacsnode token create``: the web
application alone, and its users (see :mod:`node.web.users`)."""

from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
import threading
from typing import Any

from node.config import Settings


class _Usage(Exception):
    pass


def _catalogue(settings: Settings) -> Any:
    from node.cli import _open_catalogue

    return _open_catalogue(settings)


def _operator() -> str:
    """Who ran the command, for the access log (the web's users are not system users)."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _password(args: argparse.Namespace) -> str:
    """From standard input with --password-stdin (one line), else asked twice."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise _Usage("the two passwords differ")
    return first


def _record(engine: Any, action: str, detail: str) -> None:
    from node.web import trail

    trail.record(engine, action, _operator(), "command line", detail=detail)


def cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    from node.cli_errors import CLIError
    from node.web import users

    engine = _catalogue(settings)
    try:
        if args.user_command == "list":
            listed = users.list_users(engine)
            if args.json:
                print(json.dumps(listed, indent=2))
            for user in [] if args.json else listed:
                locked = f"  locked until {user['locked_until']}" if user["locked_until"] else ""
                print(f"{user['name']:<24} {user['role']:<8} last login "
                      f"{user['last_login_at'] or '-'}{locked}")
            return 0
        if args.user_command == "add":
            users.add_user(engine, args.name, args.role, _password(args))
            _record(engine, "user_add", f"{args.name} as {args.role}")
            print(f"user {args.name} added ({args.role})")
        elif args.user_command == "passwd":
            users.set_password(engine, args.name, _password(args))
            _record(engine, "user_passwd", f"{args.name}: new password, sessions ended")
            print(f"password of {args.name} changed; their sessions are ended")
        else:
            users.remove_user(engine, args.name)
            _record(engine, "user_remove", args.name)
            print(f"user {args.name} removed, with their tokens and sessions")
    except (users.UserError, _Usage) as exc:
        raise CLIError(str(exc)) from None
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from node.cli_errors import CLIError
    from node.web import users

    engine = _catalogue(settings)
    try:
        token = users.create_token(engine, args.user, args.name or "")
    except users.UserError as exc:
        raise CLIError(str(exc)) from None
    _record(engine, "token_create", f"for {args.user} {args.name or ''}".strip())
    print(token)
    print("(shown once; use it as 'Authorization: Bearer TOKEN')", file=sys.stderr)
    return 0


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the web application alone until SIGTERM/SIGINT."""
    from node.app import StartError
    from node.audit import atna
    from node.web.server import WebServer

    engine = _catalogue(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    atna.start(settings, engine, "web")
    server = WebServer(settings, engine)
    try:
        server.start()
    except OSError as exc:
        atna.stop()
        raise StartError(str(exc)) from None
    while not stop.wait(0.5):
        pass
    server.stop()
    atna.stop()
    engine.dispose()
    return 0


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The sub-commands of this module, on the ``pacsnode`` parser."""
    web = commands.add_parser("web", parents=[common],
                              help="serve the web dashboard and REST API alone")
    web.set_defaults(func=cmd_web)

    user = commands.add_parser("user", parents=[common], help="users of the web application")
    verbs = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = verbs.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["admin", "auditor", "viewer"])
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input (one line)")
    passwd = verbs.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    remove = verbs.add_parser("remove", parents=[common], help="remove a user")
    remove.add_argument("name")
    listing = verbs.add_parser("list", parents=[common], help="list the users")
    listing.add_argument("--json", action="store_true")
    user.set_defaults(func=cmd_user)

    token = commands.add_parser("token", parents=[common], help="API tokens")
    token_verbs = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_verbs.add_parser("create", parents=[common],
                                    help="create a Bearer token for a user (printed once)")
    create.add_argument("--user", required=True)
    create.add_argument("--name", help="what the token is for (kept with it)")
    token.set_defaults(func=cmd_token)
