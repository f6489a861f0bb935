"""The console's pages (server-rendered with Jinja2, autoescaped) and the few JSON endpoints their scripts poll.

Job pages reuse the job routes' own functions (``routes/fine_tuning.py``, ``routes/quantization.py``), so the
console can do nothing the API would refuse; the playground's stream is ``routes/completions.py`` itself, reached
with the session cookie and a CSRF header instead of a bearer key.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData

from axl_mesh.errors import APIError
from axl_mesh.jobs import JobKind, QueueName, rq_queue
from axl_mesh.jobs_protocol import JobStatus
from axl_mesh.model_store import ModelStoreError
from axl_mesh.protocol import CompletionRequest
from axl_mesh.registry_client import RegistryError
from services.api_gateway.console.evaluations import cells, load_results_rows
from services.api_gateway.console.mesh_view import worker_rows
from services.api_gateway.console.session import (
    CONSOLE_PREFIX,
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    ConsoleAuth,
    csrf_error,
    same_origin,
    set_cookie,
)
from services.api_gateway.deps import MetricsDep, SettingsDep, UpstreamDep
from services.api_gateway.routes import completions, fine_tuning, quantization
from services.api_gateway.routes.files import JobsContext, JobsDep

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
JOBS_SHOWN = 50  # newest jobs of each kind on the Jobs page
EVENTS_SHOWN = 50  # newest events on a job's page
POLL_SECONDS = 3  # how often pages refresh their live parts (htmx) and the curves (console.js)

router = APIRouter(prefix=CONSOLE_PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html: every user string is escaped

# No inline script anywhere (data reaches console.js through data-* attributes); uPlot and htmx set inline styles.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make form POSTs send "Origin: null"
    "Cache-Control": "no-store",
}


def _utc(ts: Any) -> str:
    if not ts:
        return "–"
    return _dt.datetime.fromtimestamp(float(ts), _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


templates.env.filters["utc"] = _utc
templates.env.filters["num"] = _num


def console_auth(request: Request) -> ConsoleAuth:
    return request.app.state.console_auth


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """A page, with the CSRF token of this browser's nonce cookie (set here on its first visit)."""
    auth = console_auth(request)
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = nonce is None or len(nonce) != 32
    if fresh:
        nonce = auth.new_nonce()
    assert nonce is not None
    context.update(
        csrf_token=auth.csrf_token(nonce), console_open=auth.open, poll_seconds=POLL_SECONDS, prefix=CONSOLE_PREFIX
    )
    response = templates.TemplateResponse(request, name, context, status_code=status_code, headers=SECURITY_HEADERS)
    if fresh:
        set_cookie(response, CSRF_COOKIE, nonce, max_age=None, secure=request.url.scheme == "https")
    return response


async def checked_form(request: Request) -> FormData:
    """The POSTed form, refused (403) unless it carries this browser's CSRF token and comes from this origin."""
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not same_origin(request.headers) or not console_auth(request).csrf_valid(
        request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None
    ):
        raise csrf_error()
    return form


async def checked_header(request: Request) -> None:
    """For the console's fetch() calls: the CSRF token in ``X-CSRF-Token``."""
    if not same_origin(request.headers) or not console_auth(request).csrf_valid(
        request.cookies.get(CSRF_COOKIE), request.headers.get(CSRF_HEADER)
    ):
        raise csrf_error()


CheckedForm = Annotated[FormData, Depends(checked_form)]


# --- login ---------------------------------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a console path of this site (never another host: ``//evil``, ``/\\evil``)."""
    if target and target.startswith(CONSOLE_PREFIX + "/") and "//" not in target and "\\" not in target:
        return target
    return CONSOLE_PREFIX + "/mesh"


@router.get("")
def index() -> RedirectResponse:
    return RedirectResponse(CONSOLE_PREFIX + "/mesh", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query's name
    auth = console_auth(request)
    if auth.open or auth.session_valid(request.cookies.get(SESSION_COOKIE)):
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
async def login(
    request: Request, form: CheckedForm, api_key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
) -> Response:  # noqa: A002
    auth = console_auth(request)
    key = auth.matching_key(api_key.strip()) if api_key.strip() else None
    if key is None and not auth.open:
        return render(request, "login.html", status_code=401, next=_safe_next(next), error="That API key is not valid.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    if key is not None:
        set_cookie(
            response,
            SESSION_COOKIE,
            auth.session_value(key),
            max_age=auth.session_seconds,
            secure=request.url.scheme == "https",
        )
    return response


@router.post("/logout")
def logout(request: Request, form: CheckedForm) -> Response:
    response = RedirectResponse(CONSOLE_PREFIX + "/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=CONSOLE_PREFIX, httponly=True, samesite="strict")
    return response


# --- mesh ----------------------------------------------------------------------------------------------------------


async def _mesh_context(request: Request, upstream: Any) -> dict[str, Any]:
    settings = request.app.state.settings
    registry = upstream.lookup.client
    rows, error = await worker_rows(registry, settings.registry_secret_value() or "", request.app.state.console_rates)
    try:
        models = await upstream.models()
    except (RegistryError, APIError):
        models = []
    return {"workers": rows, "registry_error": error, "models": models}


def _queue_depths(ctx: JobsContext) -> dict[str, int | None]:
    depths: dict[str, int | None] = {}
    for name in QueueName:
        try:
            depths[str(name)] = rq_queue(name, ctx.rq).count
        except Exception:  # noqa: BLE001 - Redis down: the page still shows the workers
            depths[str(name)] = None
    return depths


@router.get("/mesh")
async def mesh_page(request: Request, upstream: UpstreamDep, jobs: JobsDep) -> Response:
    context = await _mesh_context(request, upstream)
    return render(request, "mesh.html", page="mesh", queues=_queue_depths(jobs), **context)


@router.get("/mesh/workers")
async def mesh_workers(request: Request, upstream: UpstreamDep) -> Response:
    return render(request, "_workers.html", **await _mesh_context(request, upstream))


# --- jobs ----------------------------------------------------------------------------------------------------------


def _jobs_context(ctx: JobsContext) -> dict[str, Any]:
    fine_tuning_jobs, _ = ctx.store.page(JobKind.FINE_TUNE, None, JOBS_SHOWN)
    quantization_jobs, _ = ctx.store.page(JobKind.QUANTIZE, None, JOBS_SHOWN)
    return {"fine_tuning_jobs": fine_tuning_jobs, "quantization_jobs": quantization_jobs}


@router.get("/jobs")
def jobs_page(request: Request, ctx: JobsDep) -> Response:
    return render(request, "jobs.html", page="jobs", **_jobs_context(ctx))


@router.get("/jobs/tables")
def jobs_tables(request: Request, ctx: JobsDep) -> Response:
    return render(request, "_jobs_tables.html", **_jobs_context(ctx))


def _job_context(ctx: JobsContext, job_id: str) -> dict[str, Any]:
    record = fine_tuning.get_job_record(ctx, job_id).model_dump(mode="json")
    events, _ = ctx.store.events_page(job_id, None, EVENTS_SHOWN)
    quantization_jobs = [
        q
        for q in (ctx.store.get(JobKind.QUANTIZE, q_id) for q_id in record.get("quantization_jobs") or [])
        if q is not None
    ]
    return {
        "job": record,
        "events": events,
        "terminal": JobStatus(record["status"]).terminal,
        "checkpoints": list(reversed(ctx.store.checkpoints(job_id))),
        "quantization_jobs": quantization_jobs,
    }


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, ctx: JobsDep) -> Response:
    return render(request, "job.html", page="jobs", error=None, **_job_context(ctx, job_id))


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: str, ctx: JobsDep) -> Response:
    return render(request, "_job_live.html", **_job_context(ctx, job_id))


@router.get("/jobs/{job_id}/events")
def job_events(request: Request, job_id: str, ctx: JobsDep) -> Response:
    return render(request, "_job_events.html", **_job_context(ctx, job_id))


def curves(record: dict[str, Any], events_oldest_first: list[dict[str, Any]]) -> dict[str, Any]:
    """Training loss and held-out bits/byte by step, from the job's metrics events and its live progress.

    One value per step (a resumed attempt re-logs steps it redoes: the latest wins), in step order."""
    loss: dict[int, float] = {}
    val_bpb: dict[int, float] = {}
    for event in events_oldest_first:
        data = event.get("data") or {}
        if event.get("type") != "metrics" or not isinstance(data.get("step"), int):
            continue
        if isinstance(data.get("train_loss"), (int, float)):
            loss[data["step"]] = float(data["train_loss"])
        if isinstance(data.get("val_bpb"), (int, float)):
            val_bpb[data["step"]] = float(data["val_bpb"])
    progress = record.get("progress") or {}
    if isinstance(progress.get("step"), int) and isinstance(progress.get("loss"), (int, float)):
        loss[progress["step"]] = float(progress["loss"])  # the newest step, between once-a-second events

    def series(points: dict[int, float]) -> dict[str, list[Any]]:
        steps = sorted(points)
        return {"steps": steps, "values": [points[s] for s in steps]}

    return {
        "id": record["id"],
        "status": record["status"],
        "done": JobStatus(record["status"]).terminal,
        "loss": series(loss),
        "val_bpb": series(val_bpb),
        "progress": progress or None,
    }


@router.get("/api/jobs/{job_id}/curves")
def job_curves(job_id: str, ctx: JobsDep) -> JSONResponse:
    record = fine_tuning.get_job_record(ctx, job_id).model_dump(mode="json")
    events, _ = ctx.store.events_page(job_id, None, ctx.store.events_max)
    return JSONResponse(curves(record, list(reversed(events))), headers={"Cache-Control": "no-store"})


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str, ctx: JobsDep, form: CheckedForm) -> Response:
    try:
        fine_tuning.cancel_job(job_id, ctx)
    except APIError as exc:
        if exc.status == 404:
            raise
        return render(
            request, "job.html", status_code=exc.status, page="jobs", error=exc.message, **_job_context(ctx, job_id)
        )
    return RedirectResponse(f"{CONSOLE_PREFIX}/jobs/{job_id}", status_code=303)


@router.get("/quantization/{job_id}/files/{filename}")
def download_gguf(job_id: str, filename: str, ctx: JobsDep) -> FileResponse:
    return quantization.download_file(job_id, filename, ctx)


# --- models --------------------------------------------------------------------------------------------------------


@router.get("/models")
async def models_page(request: Request, upstream: UpstreamDep, ctx: JobsDep) -> Response:
    try:
        served = {m.id: m for m in await upstream.models()}
        registry_error = None
    except (RegistryError, APIError) as exc:
        served, registry_error = {}, str(exc)
    try:
        stored = ctx.models.entries()
    except ModelStoreError as exc:
        stored, registry_error = {}, str(exc)
    rows_data = load_results_rows(request.app.state.settings.console_results_file)
    names = list(served) + [
        name for name in sorted(stored, key=lambda n: stored[n].get("created", 0)) if name not in served
    ]
    rows = []
    for name in names:
        entry, summary = stored.get(name), served.get(name)
        rows.append(
            {
                "name": name,
                "specialist": (summary.specialist if summary else (entry or {}).get("specialist")) or "–",
                "context_length": summary.context_length if summary else (entry or {}).get("context_length"),
                "instances": summary.instances if summary else 0,
                "stored": entry is not None,
                "base": (entry or {}).get("base"),
                "job_id": (entry or {}).get("job_id"),
                "gguf": sorted((entry or {}).get("gguf") or {}),
                "eval": cells(name, entry, rows_data),
            }
        )
    return render(request, "models.html", page="models", models=rows, error=registry_error)


# --- playground ----------------------------------------------------------------------------------------------------


@router.get("/playground")
async def playground_page(request: Request, upstream: UpstreamDep) -> Response:
    try:
        models = await upstream.models()
        error = None
    except (RegistryError, APIError) as exc:
        models, error = [], str(exc)
    return render(request, "playground.html", page="playground", models=models, error=error)


@router.post("/api/completions", dependencies=[Depends(checked_header)])
async def playground_completion(
    body: CompletionRequest, request: Request, upstream: UpstreamDep, settings: SettingsDep, metrics: MetricsDep
) -> Any:
    """``POST /v1/completions`` for the logged-in console (session cookie + CSRF header instead of a bearer key)."""
    return await completions.create_completion(body, request, upstream, settings, metrics)
