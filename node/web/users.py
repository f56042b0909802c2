"""Users, passwords and API tokens: what ``pacsnode user``/``token`` and the login use.

Passwords are hashed with argon2id (memory-hard; argon2-cffi's defaults, parameters
stored in the hash so they can be raised later). API tokens are random 256-bit
strings; only their SHA-256 is kept, since a token that long cannot be guessed and is
checked on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, Table, delete, select, update

from db.tables import ApiToken, User, WebSession, utcnow

ROLES = ("admin", "auditor", "viewer")
MIN_PASSWORD = 12

_users: Table = User.__table__  # type: ignore[assignment]
_tokens: Table = ApiToken.__table__  # type: ignore[assignment]
_sessions: Table = WebSession.__table__  # type: ignore[assignment]
_hasher = PasswordHasher()
# Verified against when the user does not exist, so that a wrong name costs as long as
# a wrong password and the timing does not tell which names exist.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class UserError(ValueError):
    """A user operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Account:
    """A user as the web application sees one."""

    id: int
    name: str
    role: str


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    return password


def add_user(engine: Engine, name: str, role: str, password: str) -> Account:
    """Create a user; the name must be new and the role one of :data:`ROLES`."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
        raise UserError("a user name is 1 to 64 printable characters, no surrounding spaces")
    encoded = _hasher.hash(check_password(password))
    with engine.begin() as conn:
        if conn.execute(select(_users.c.id).where(_users.c.name == name)).first():
            raise UserError(f"user {name!r} exists already")
        now = utcnow()
        new_id = conn.execute(_users.insert().values(
            name=name, role=role, password_hash=encoded, created_at=now,
            password_changed_at=now, failed_logins=0)).inserted_primary_key[0]
    return Account(int(new_id), name, role)


def list_users(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(select(_users).order_by(_users.c.name)).all()
    return [{"name": r.name, "role": r.role, "created_at": r.created_at.isoformat(),
             "last_login_at": r.last_login_at.isoformat() if r.last_login_at else None,
             "locked_until": r.locked_until.isoformat() if r.locked_until else None}
            for r in rows]


def _user_id(conn: object, name: str) -> int:
    row = conn.execute(select(_users.c.id).where(_users.c.name == name)).first()  # type: ignore[attr-defined]
    if row is None:
        raise UserError(f"no user {name!r}")
    return int(row.id)


def remove_user(engine: Engine, name: str) -> None:
    """Remove a user, its tokens and its sessions (the access log keeps its name)."""
    with engine.begin() as conn:
        user_id = _user_id(conn, name)
        conn.execute(delete(_tokens).where(_tokens.c.user_fk == user_id))
        conn.execute(delete(_sessions).where(_sessions.c.user_fk == user_id))
        conn.execute(delete(_users).where(_users.c.id == user_id))


def set_password(engine: Engine, name: str, password: str) -> None:
    """A new password; it unlocks the account and ends the user's sessions."""
    encoded = _hasher.hash(check_password(password))
    with engine.begin() as conn:
        user_id = _user_id(conn, name)
        conn.execute(update(_users).where(_users.c.id == user_id).values(
            password_hash=encoded, password_changed_at=utcnow(), failed_logins=0,
            locked_until=None))
        conn.execute(delete(_sessions).where(_sessions.c.user_fk == user_id))


def create_token(engine: Engine, name: str, label: str = "") -> str:
    """A new Bearer token for the user; returned once, only its hash is kept."""
    token = "pn_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        user_id = _user_id(conn, name)
        conn.execute(_tokens.insert().values(user_fk=user_id, token_hash=sha256(token),
                                             name=label[:64], created_at=utcnow()))
    return token


def token_account(engine: Engine, token: str) -> Account | None:
    """The user a Bearer token belongs to, or ``None``."""
    with engine.begin() as conn:
        row = conn.execute(
            select(_tokens.c.id, _users.c.id.label("user_id"), _users.c.name, _users.c.role)
            .join(_users, _users.c.id == _tokens.c.user_fk)
            .where(_tokens.c.token_hash == sha256(token))
        ).first()
        if row is None:
            return None
        conn.execute(update(_tokens).where(_tokens.c.id == row.id)
                     .values(last_used_at=utcnow()))
    return Account(int(row.user_id), row.name, row.role)


@dataclass(frozen=True)
class LoginOutcome:
    """What a login attempt came to: the account, or why not (``reason``)."""

    account: Account | None
    reason: str = ""
    locked_now: bool = False


def authenticate(engine: Engine, name: str, password: str, max_failures: int,
                 lockout_s: float, now: datetime | None = None) -> LoginOutcome:
    """Check a name and password, counting failures: after ``max_failures`` in a row
    the account is locked for ``lockout_s`` (a correct password does not open it)."""
    now = now or utcnow()
    with engine.begin() as conn:
        row = conn.execute(select(_users).where(_users.c.name == name)).first()
        if row is None:
            _verify(_DUMMY_HASH, password)
            return LoginOutcome(None, "unknown user")
        if row.locked_until is not None and row.locked_until > now:
            _verify(_DUMMY_HASH, password)
            return LoginOutcome(None, "account locked")
        if not _verify(row.password_hash, password):
            failures = row.failed_logins + 1
            locked = failures >= max_failures
            conn.execute(update(_users).where(_users.c.id == row.id).values(
                failed_logins=0 if locked else failures,
                locked_until=now + timedelta(seconds=lockout_s) if locked else None))
            return LoginOutcome(None, "wrong password", locked_now=locked)
        conn.execute(update(_users).where(_users.c.id == row.id).values(
            failed_logins=0, locked_until=None, last_login_at=now))
    return LoginOutcome(Account(int(row.id), row.name, row.role))


def _verify(encoded: str, password: str) -> bool:
    try:
        return _hasher.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False
