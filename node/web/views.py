"""What pages and API share: reading the search parameters, and the audited reads (a
search, a study viewed, a result downloaded), each recorded in the access log and
reported as an ATNA message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from node.audit import atna
from node.audit_queries import StudyFilter, search_studies, study_detail
from node.web import trail
from node.web.auth import Principal, client_of
from node.web.result_files import result_file

_DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")
STATUSES = ("receiving", "stable", "processing", "analyzed")


def _date(value: str, name: str) -> str:
    value = value.strip()
    if value and not _DATE.match(value):
        raise HTTPException(422, f"{name}: a date is YYYY-MM-DD or YYYYMMDD, got {value!r}")
    return value.replace("-", "")


def study_filter(patient_id: str = "", patient_name: str = "", accession_number: str = "",
                 date_from: str = "", date_to: str = "", status: str = "",
                 calling_ae: str = "") -> StudyFilter:
    """The search's parameters, checked (a FastAPI dependency)."""
    if status and status not in STATUSES:
        raise HTTPException(422, f"status: one of {', '.join(STATUSES)}, got {status!r}")
    return StudyFilter(patient_id=patient_id.strip(), patient_name=patient_name.strip(),
                       accession_number=accession_number.strip(),
                       date_from=_date(date_from, "date_from"), date_to=_date(date_to, "date_to"),
                       status=status, calling_ae=calling_ae.strip())


def filter_params(where: StudyFilter) -> dict[str, str]:
    """The non-empty parameters of a search (for the audit and the page links)."""
    return {k: v for k, v in vars(where).items() if v}


def search(request: Request, who: Principal, where: StudyFilter, page: int,
           page_size: int | None = None) -> dict[str, Any]:
    context = request.app.state.ctx
    size = page_size or context.settings.web.page_size
    found = search_studies(context.engine, where, page, size)
    params = filter_params(where)
    detail = ", ".join(f"{k}={v}" for k, v in params.items()) or "all studies"
    client = client_of(request)
    trail.record(context.engine, "search", who.name, client,
                 detail=f"{detail}; page {found['page']}: {len(found['studies'])} of "
                 f"{found['total']}", patient_id=where.patient_id or None)
    atna.query(who.name, client, params)
    return found


def view_study(request: Request, who: Principal, uid: str) -> dict[str, Any]:
    context = request.app.state.ctx
    detail = study_detail(context.engine, uid)
    client = client_of(request)
    if detail is None:
        trail.record(context.engine, "view_study", who.name, client, outcome="not found",
                     study_uid=uid[:64])
        raise HTTPException(404, f"no study with Study Instance UID {uid}")
    trail.record(context.engine, "view_study", who.name, client, study_uid=uid,
                 patient_id=detail["patient_id"])
    atna.study_accessed(who.name, client, uid)
    return detail


def patient_of(engine: Any, study_uid: str) -> str | None:
    """The Patient ID of a study, for the access log."""
    from node.audit.lookup import study_object

    return study_object(engine, study_uid).patient_id or None


def download(request: Request, who: Principal, study_uid: str, result_id: int,
             audited: bool = True) -> tuple[Path, str]:
    """A result file of a study; a download is recorded (``audited``)."""
    context = request.app.state.ctx
    found = result_file(context.engine, context.settings.storage.data_dir, study_uid,
                        result_id)
    if found is None:
        raise HTTPException(404, f"study {study_uid} has no result {result_id} on disk")
    path, kind = found
    if audited:
        client = client_of(request)
        trail.record(context.engine, "download", who.name, client, study_uid=study_uid,
                     patient_id=patient_of(context.engine, study_uid),
                     detail=f"{kind} {path.name}")
        atna.export(who.name, client, study_uid, f"{kind}:{path.name}")
    return found
