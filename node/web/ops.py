"""Operations endpoints, without login: /health, /ready, /metrics.

They reveal no patient data: process state and counts only.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

router = APIRouter(tags=["operations"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is alive (it answers)."""
    return {"status": "ok"}


def _database(context: Any) -> str:
    try:
        with context.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"unreachable: {str(exc).splitlines()[0][:200]}"
    return "ok"


def _storage(context: Any) -> str:
    folder = context.settings.storage.data_dir
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
    return "ok"


def _dicom(context: Any) -> str:
    ports = context.dicom_ports()
    if not ports:
        return "not served by this process"
    host = context.settings.node.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    for port in ports:
        try:
            with socket.create_connection((host, port), timeout=2):
                pass
        except OSError as exc:
            return f"port {port} not listening: {exc.strerror or exc}"
    return "ok"


@router.get("/ready")
def ready(request: Request) -> Response:
    """Database reachable, storage writable, DICOM port(s) listening; 503 otherwise."""
    context = request.app.state.ctx
    checks = {"database": _database(context), "storage": _storage(context),
              "dicom": _dicom(context)}
    ok = all(value in ("ok", "not served by this process") for value in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                        status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
