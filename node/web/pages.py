"""The server-rendered pages: login, dashboard, studies, a study, deliveries,
associations, the access log. Every page is a URL an auditor can bookmark; forms POST
with the session's CSRF token and redirect back (post/redirect/get)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from node.audit import atna
from node.audit_queries import StudyFilter
from node.web import auth, read_model, trail, users, views
from node.web.api import do_rerun, do_resend
from node.web.auth import Principal, check_csrf, client_of, require
from node.web.result_files import measurements

router = APIRouter(include_in_schema=False)


def _render(request: Request, name: str, who: Principal | None, **values: Any) -> Response:
    context = request.app.state.ctx
    values.setdefault("note", request.query_params.get("note", ""))
    return context.templates.TemplateResponse(request, name, {"who": who, **values})


def _safe_next(target: str) -> str:
    """Only a path of this site (never //host or a scheme): no open redirect."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login")
def login_form(request: Request, next: str = "/", error: str = "") -> Response:
    import secrets

    token = secrets.token_urlsafe(32)
    response = _render(request, "login.html", None, next=_safe_next(next), error=error,
                       csrf=token)
    response.set_cookie(auth.LOGIN_CSRF_COOKIE, token, max_age=3600,
                        **auth.cookie_options(request))
    return response


@router.post("/login")
def login(request: Request, username: str = Form(...), password: str = Form(...),
          csrf_token: str = Form(""), next: str = Form("/")) -> Response:
    import hmac

    context = request.app.state.ctx
    web, client = context.settings.web, client_of(request)
    expected = request.cookies.get(auth.LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf_token.encode()):
        return RedirectResponse("/login?error=stale", status_code=303)
    outcome = users.authenticate(context.engine, username, password, web.lockout_attempts,
                                 web.lockout_s)
    if outcome.account is None:
        trail.record(context.engine, "login_failed", username, client, outcome="refused",
                     detail=outcome.reason + ("; account now locked" if outcome.locked_now
                                              else ""))
        atna.user_login(username, client, False, outcome.reason)
        if outcome.locked_now:
            atna.security_alert_user(username, client, f"account locked after "
                                     f"{web.lockout_attempts} failed logins", locked=True)
        # One message for every cause, so the form does not tell which names exist.
        return RedirectResponse(f"/login?error=failed&next={_quote(next)}", status_code=303)
    token, _csrf = auth.create_session(request, outcome.account)
    trail.record(context.engine, "login", username, client)
    atna.user_login(username, client, True)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(auth.COOKIE, token, **auth.cookie_options(request))
    response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/")
    return response


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(_safe_next(text), safe="")


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form(""),
           who: Principal = Depends(require("viewer"))) -> Response:
    check_csrf(request, who, csrf_token)
    auth.end_session(request, who)
    trail.record(request.app.state.ctx.engine, "logout", who.name, client_of(request))
    atna.user_logout(who.name, client_of(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/")
    return response


@router.get("/")
def dashboard(request: Request, who: Principal = Depends(require("viewer"))) -> Response:
    data = read_model.dashboard(request.app.state.ctx.engine)
    return _render(request, "dashboard.html", who, data=data)


@router.get("/studies")
def studies(request: Request, where: StudyFilter = Depends(views.study_filter),
            page: int = Query(1, ge=1), who: Principal = Depends(require("viewer"))
            ) -> Response:
    found = views.search(request, who, where, page)
    params = views.filter_params(where)
    pages = max((found["total"] + found["page_size"] - 1) // found["page_size"], 1)
    links = {n: "/studies?" + urlencode({**params, "page": n}) for n in (page - 1, page + 1)}
    return _render(request, "studies.html", who, found=found, where=where, pages=pages,
                   links=links, statuses=views.STATUSES)


def _measurements_of(request: Request, detail: dict[str, Any]) -> dict[int, Any]:
    """result id -> measurements table, for each SR of the study."""
    data_dir = request.app.state.ctx.settings.storage.data_dir
    tables = {}
    for series in detail["series"]:
        for job in series["jobs"]:
            for result in job["results"]:
                if result["kind"] == "sr":
                    tables[result["result_id"]] = measurements(data_dir / result["file"])
    return tables


@router.get("/studies/{uid}")
def study(request: Request, uid: str, who: Principal = Depends(require("viewer"))) -> Response:
    detail = views.view_study(request, who, uid)
    return _render(request, "study.html", who, study=detail,
                   tables=_measurements_of(request, detail))


@router.get("/studies/{uid}/results/{result_id}/preview")
def preview(request: Request, uid: str, result_id: int,
            who: Principal = Depends(require("viewer"))) -> Response:
    """The preview shown on the study page (viewing it is part of viewing the study)."""
    path, kind = views.download(request, who, uid, result_id, audited=False)
    if kind != "preview":
        raise HTTPException(404, "not a preview")
    return FileResponse(path, media_type="image/png")


@router.get("/studies/{uid}/results/{result_id}/file")
def result_file(request: Request, uid: str, result_id: int,
                who: Principal = Depends(require("auditor"))) -> Response:
    path, kind = views.download(request, who, uid, result_id)
    media = "image/png" if kind == "preview" else "application/dicom"
    return FileResponse(path, media_type=media, filename=path.name)


@router.post("/studies/{uid}/rerun")
def rerun(request: Request, uid: str, csrf_token: str = Form(""),
          series_instance_uid: str = Form(""), who: Principal = Depends(require("admin"))
          ) -> Response:
    check_csrf(request, who, csrf_token)
    try:
        queued = do_rerun(request, who, uid, series_instance_uid or None)
        note = f"re-run queued: job(s) {', '.join(map(str, queued)) or 'none'}"
    except HTTPException as exc:
        note = f"re-run refused: {exc.detail}"
    return RedirectResponse(f"/studies/{uid}?" + urlencode({"note": note}), status_code=303)


@router.get("/deliveries")
def deliveries(request: Request, status: str = "", destination: str = "",
               page: int = Query(1, ge=1),
               who: Principal = Depends(require("viewer"))) -> Response:
    context = request.app.state.ctx
    found = read_model.deliveries(context.engine, status, destination, page,
                                  context.settings.web.page_size)
    return _render(request, "deliveries.html", who, found=found, status=status,
                   destination=destination,
                   destinations=read_model.destination_names(context.engine),
                   links=_links("/deliveries", {"status": status, "destination": destination},
                                page))


@router.post("/deliveries/{delivery_id}/resend")
def resend(request: Request, delivery_id: int, csrf_token: str = Form(""),
           back: str = Form("/deliveries"), who: Principal = Depends(require("admin"))
           ) -> Response:
    check_csrf(request, who, csrf_token)
    done = do_resend(request, who, [delivery_id])
    note = f"delivery {delivery_id} will be sent again" if done else \
        f"delivery {delivery_id} is being sent; not resent"
    return _back(back, note)


@router.post("/deliveries/resend-failed")
def resend_failed(request: Request, csrf_token: str = Form(""), destination: str = Form(""),
                  who: Principal = Depends(require("admin"))) -> Response:
    from node.web import actions

    check_csrf(request, who, csrf_token)
    done = do_resend(request, who, actions.failed_ids(request.app.state.ctx.engine,
                                                      destination))
    return _back("/deliveries", f"{len(done)} failed deliveries will be sent again")


def _back(target: str, note: str) -> Response:
    target = _safe_next(target)
    joiner = "&" if "?" in target else "?"
    return RedirectResponse(target + joiner + urlencode({"note": note}), status_code=303)


def _links(path: str, params: dict[str, str], page: int) -> dict[int, str]:
    kept = {k: v for k, v in params.items() if v}
    return {n: f"{path}?" + urlencode({**kept, "page": n}) for n in (page - 1, page + 1)}


@router.get("/associations")
def associations(request: Request, outcome: str = "", calling_ae: str = "",
                 page: int = Query(1, ge=1), who: Principal = Depends(require("viewer"))
                 ) -> Response:
    context = request.app.state.ctx
    found = read_model.associations(context.engine, outcome, calling_ae, page,
                                    context.settings.web.page_size)
    return _render(request, "associations.html", who, found=found, outcome=outcome,
                   calling_ae=calling_ae,
                   links=_links("/associations", {"outcome": outcome, "calling_ae": calling_ae},
                                page))


@router.get("/access-log")
def access_log(request: Request, username: str = "", action: str = "", study: str = "",
               page: int = Query(1, ge=1), who: Principal = Depends(require("auditor"))
               ) -> Response:
    context = request.app.state.ctx
    found = read_model.access_log(context.engine, username, action, study, page,
                                  context.settings.web.page_size)
    return _render(request, "access_log.html", who, found=found, username=username,
                   action=action, study=study,
                   links=_links("/access-log", {"username": username, "action": action,
                                                "study": study}, page))
