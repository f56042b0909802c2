"""The REST API under /api (OpenAPI at /api/docs). Studies and a study are shaped like
``pacsnode studies --json`` and ``study UID --json``; lists are paginated
(``page``, ``page_size``) and say their ``total``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse

from node.audit_queries import StudyFilter
from node.web import actions, read_model, trail, views
from node.web.auth import Principal, check_csrf, client_of, require
from node.web.result_files import measurements

router = APIRouter(prefix="/api", tags=["api"])
_PAGE = Query(1, ge=1)
_SIZE = Query(None, ge=1, le=1000)


def _size(request: Request, page_size: int | None) -> int:
    return page_size or request.app.state.ctx.settings.web.page_size


@router.get("/studies")
def studies(request: Request, where: StudyFilter = Depends(views.study_filter),
            page: int = _PAGE, page_size: int | None = _SIZE,
            who: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    """Studies newest first: patient ID (exact), name (prefix), accession number, study
    date range (YYYY-MM-DD), status, calling AE title."""
    return views.search(request, who, where, page, page_size)


@router.get("/studies/{uid}")
def study(request: Request, uid: str, who: Principal = Depends(require("viewer"))
          ) -> dict[str, Any]:
    """One study as ``pacsnode study UID --json`` prints it."""
    return views.view_study(request, who, uid)


@router.get("/studies/{uid}/results/{result_id}/measurements")
def result_measurements(request: Request, uid: str, result_id: int,
                        who: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    """The measurements of an SR result, per structure, and the predicted region."""
    path, kind = views.download(request, who, uid, result_id, audited=False)
    if kind != "sr":
        raise HTTPException(404, f"result {result_id} is a {kind}, not an SR")
    return measurements(path)


@router.get("/studies/{uid}/results/{result_id}/file")
def result_download(request: Request, uid: str, result_id: int,
                    who: Principal = Depends(require("auditor"))) -> FileResponse:
    """Download a result: the SEG or SR (DICOM) or the preview (PNG)."""
    path, kind = views.download(request, who, uid, result_id)
    media = "image/png" if kind == "preview" else "application/dicom"
    return FileResponse(path, media_type=media, filename=path.name)


@router.get("/jobs")
def jobs(request: Request, status: str = "", page: int = _PAGE,
         page_size: int | None = _SIZE, _who: Principal = Depends(require("viewer"))
         ) -> dict[str, Any]:
    """Analysis jobs newest first, by status."""
    return read_model.jobs(request.app.state.ctx.engine, status, page, _size(request, page_size))


@router.get("/deliveries")
def deliveries(request: Request, status: str = "", destination: str = "",
               page: int = _PAGE, page_size: int | None = _SIZE,
               _who: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    """Deliveries newest first, by status and destination."""
    return read_model.deliveries(request.app.state.ctx.engine, status, destination, page,
                                 _size(request, page_size))


@router.get("/associations")
def associations(request: Request, outcome: str = "", calling_ae: str = "",
                 page: int = _PAGE, page_size: int | None = _SIZE,
                 _who: Principal = Depends(require("viewer"))) -> dict[str, Any]:
    """DICOM associations newest first (rejections with their reasons)."""
    return read_model.associations(request.app.state.ctx.engine, outcome, calling_ae, page,
                                   _size(request, page_size))


@router.get("/dashboard")
def dashboard(request: Request, _who: Principal = Depends(require("viewer"))
              ) -> dict[str, Any]:
    return read_model.dashboard(request.app.state.ctx.engine)


@router.get("/access-log")
def access_log(request: Request, username: str = "", action: str = "", study: str = "",
               page: int = _PAGE, page_size: int | None = _SIZE,
               _who: Principal = Depends(require("auditor"))) -> dict[str, Any]:
    """Who did what, when, from where, to which study and patient."""
    return read_model.access_log(request.app.state.ctx.engine, username, action, study, page,
                                 _size(request, page_size))


def do_resend(request: Request, who: Principal, ids: list[int]) -> list[int]:
    """Resend and record each delivery (shared with the pages)."""
    context = request.app.state.ctx
    done = actions.resend(context.engine, ids, who.name)
    for delivery_id in ids:
        where = actions.delivery_study(context.engine, delivery_id) or {}
        trail.record(context.engine, "resend", who.name, client_of(request),
                     outcome="ok" if delivery_id in done else "not resendable",
                     study_uid=where.get("study_uid"), patient_id=where.get("patient_id"),
                     detail=f"delivery {delivery_id} to {where.get('destination', '?')}")
    return done


@router.post("/deliveries/{delivery_id}/resend")
def resend(request: Request, delivery_id: int, who: Principal = Depends(require("admin"))
           ) -> dict[str, Any]:
    """Send a delivery again: pending, due now, attempts reset."""
    check_csrf(request, who, None)
    done = do_resend(request, who, [delivery_id])
    if not done:
        raise HTTPException(409, f"delivery {delivery_id} does not exist or is being sent")
    return {"resent": done}


@router.post("/deliveries/resend-failed")
def resend_failed(request: Request, destination: str = "",
                  who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Send every failed delivery (of one destination) again."""
    check_csrf(request, who, None)
    ids = actions.failed_ids(request.app.state.ctx.engine, destination)
    return {"resent": do_resend(request, who, ids)}


def do_rerun(request: Request, who: Principal, uid: str, series: str | None) -> list[int]:
    from node.workflow.jobs import RerunError

    context = request.app.state.ctx
    what = f"series {series}" if series else "all series"
    try:
        queued = actions.rerun(context.engine, context.settings, uid, series)
    except RerunError as exc:
        trail.record(context.engine, "rerun", who.name, client_of(request),
                     outcome="refused", study_uid=uid[:64], detail=f"{what}: {exc}")
        raise HTTPException(409, str(exc)) from None
    trail.record(context.engine, "rerun", who.name, client_of(request), study_uid=uid,
                 patient_id=views.patient_of(context.engine, uid), detail=f"{what}: jobs {queued}")
    return queued


@router.post("/studies/{uid}/rerun")
def rerun(request: Request, uid: str, series_instance_uid: str | None = Body(None, embed=True),
          who: Principal = Depends(require("admin"))) -> dict[str, Any]:
    """Analyse the study (or one series) again: new jobs and results, the old kept."""
    check_csrf(request, who, None)
    return {"queued": do_rerun(request, who, uid, series_instance_uid)}
