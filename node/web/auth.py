"""Who is asking: a session cookie (browsers), a Bearer token (scripts), or nobody.

Sessions live in the database (``web_sessions``, the cookie's SHA-256 only), so a
password change or a removed user ends them at once, and they end after
``web.session_idle_s`` unused or ``web.session_max_s`` after login. Every POST from a
session carries its CSRF token (a form field, or the ``X-CSRF-Token`` header); a
Bearer request is not exposed to CSRF (a browser never adds the header by itself).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Request
from sqlalchemy import Table, delete, select, update

from db.tables import User, WebSession, utcnow
from node.web import users

COOKIE = "pacsnode_session"
LOGIN_CSRF_COOKIE = "pacsnode_login_csrf"
RANK = {"viewer": 0, "auditor": 1, "admin": 2}
_TOUCH_S = 30  # last_seen_at is written at most this often (a write per page is too many)

_sessions: Table = WebSession.__table__  # type: ignore[assignment]
_users: Table = User.__table__  # type: ignore[assignment]


class NeedLogin(Exception):
    """No valid session or token: pages redirect to the login form, the API says 401."""


class Forbidden(Exception):
    """The user's role does not allow this; the message says what was refused."""


@dataclass(frozen=True)
class Principal:
    """The user behind a request, and how they proved it."""

    name: str
    role: str
    via: str  # session, token or static-token
    csrf: str = ""
    session_id: int | None = None

    def may(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def ctx(request: Request) -> Any:
    return request.app.state.ctx


def create_session(request: Request, account: users.Account) -> tuple[str, str]:
    """A new session for ``account``: (cookie value, CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    with ctx(request).engine.begin() as conn:
        conn.execute(_sessions.insert().values(
            token_hash=users.sha256(token), user_fk=account.id, csrf_token=csrf,
            client=client_of(request)[:255], created_at=now, last_seen_at=now))
    return token, csrf


def end_session(request: Request, principal: Principal) -> None:
    if principal.session_id is not None:
        with ctx(request).engine.begin() as conn:
            conn.execute(delete(_sessions).where(_sessions.c.id == principal.session_id))


def _from_session(request: Request, cookie: str) -> Principal | None:
    web = ctx(request).settings.web
    now = utcnow()
    with ctx(request).engine.begin() as conn:
        row = conn.execute(
            select(_sessions.c.id, _sessions.c.csrf_token, _sessions.c.created_at,
                   _sessions.c.last_seen_at, _users.c.name, _users.c.role)
            .join(_users, _users.c.id == _sessions.c.user_fk)
            .where(_sessions.c.token_hash == users.sha256(cookie))).first()
        if row is None:
            return None
        if (now - row.last_seen_at > timedelta(seconds=web.session_idle_s)
                or now - row.created_at > timedelta(seconds=web.session_max_s)):
            conn.execute(delete(_sessions).where(_sessions.c.id == row.id))
            return None
        if (now - row.last_seen_at).total_seconds() > _TOUCH_S:
            conn.execute(update(_sessions).where(_sessions.c.id == row.id)
                         .values(last_seen_at=now))
    return Principal(row.name, row.role, "session", row.csrf_token, row.id)


def _from_bearer(request: Request, token: str) -> Principal | None:
    web = ctx(request).settings.web
    if web.api_token and hmac.compare_digest(token.encode(), web.api_token.encode()):
        return Principal("api-token", web.api_token_role, "static-token")
    account = users.token_account(ctx(request).engine, token)
    return Principal(account.name, account.role, "token") if account else None


def principal(request: Request) -> Principal | None:
    """The request's user, or ``None``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return _from_bearer(request, token.strip())
    cookie = request.cookies.get(COOKIE)
    return _from_session(request, cookie) if cookie else None


def require(role: str) -> Any:
    """A FastAPI dependency: the request's principal, at least ``role``."""
    def dependency(request: Request) -> Principal:
        who = principal(request)
        if who is None:
            raise NeedLogin()
        if not who.may(role):
            raise Forbidden(f"{request.method} {request.url.path} needs the {role} role")
        request.state.principal = who
        return who
    return dependency


def check_csrf(request: Request, who: Principal, form_token: str | None) -> None:
    """A POST made with a session must carry the session's CSRF token."""
    if who.via != "session":
        return
    given = form_token or request.headers.get("x-csrf-token", "")
    if not given or not hmac.compare_digest(given.encode(), who.csrf.encode()):
        raise Forbidden("the form is stale or forged (CSRF token missing or wrong): "
                        "reload the page and try again")


def cookie_options(request: Request) -> dict[str, Any]:
    """HttpOnly, SameSite=Strict, and Secure when served over HTTPS."""
    return {"httponly": True, "samesite": "strict",
            "secure": ctx(request).settings.web.tls is not None, "path": "/"}
