"""The FastAPI application: operations endpoints, pages and the REST API, and how a
missing login or a refused role is answered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine

from node import __version__
from node.audit import atna
from node.config import Settings
from node.web import trail
from node.web.auth import Forbidden, NeedLogin, client_of, principal
from node.web.metrics import Metrics

HERE = Path(__file__).parent


@dataclass
class WebContext:
    """What the web application reads: the settings, the database, and which DICOM
    ports this process serves (empty for ``pacsnode web`` alone)."""

    settings: Settings
    engine: Engine
    dicom_ports: Callable[[], list[int]] = list
    metrics: Metrics = field(init=False)
    templates: Jinja2Templates = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api")


def _need_login(request: Request, _exc: Exception) -> Response:
    if _is_api(request):
        return JSONResponse({"detail": "authentication required: a session or "
                             "'Authorization: Bearer TOKEN'"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _forbidden(request: Request, exc: Exception) -> Response:
    context: WebContext = request.app.state.ctx
    who = getattr(request.state, "principal", None) or principal(request)
    name, client = (who.name if who else ""), client_of(request)
    trail.record(context.engine, "denied", name, client, outcome="refused", detail=str(exc))
    atna.security_alert_user(name, client, str(exc))
    if _is_api(request):
        return JSONResponse({"detail": str(exc)}, status_code=403)
    return context.templates.TemplateResponse(
        request, "error.html", {"who": who, "title": "Not allowed", "message": str(exc)},
        status_code=403)


def create_app(context: WebContext) -> FastAPI:
    """The application serving ``context``."""
    from node.web import api, ops, pages

    app = FastAPI(title="pacsnode", version=__version__, docs_url="/api/docs",
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.ctx = context
    app.add_exception_handler(NeedLogin, _need_login)
    app.add_exception_handler(Forbidden, _forbidden)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(ops.router)
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        # Patient data: never cached, never framed by another site.
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/api/docs"):
            response.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        if context.settings.web.tls is not None:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    return app
