"""``/dashboard``: sign-in, the page shells, and the static scripts and styles.

Each page is a small HTML shell (``templates/page.html``) naming its page;
``static/app.js`` loads that page's module, which reads the ``/v1`` JSON API
with the session cookie (GET only: :func:`services.api.deps.get_caller`).

Access: an admin token, either in ``Authorization: Bearer`` or in the
``fitfleet_session`` cookie that ``POST /dashboard/login`` sets. A page asked
for without one is a 303 to the sign-in form; a project token is a 403 (the
dashboard spans every project).

Every page carries a Content-Security-Policy that allows this server's own
scripts and styles only (no inline script, no CDN); images may also come from
other hosts because an artifact on S3 is a redirect to a presigned URL.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from services.api.auth import Caller
from services.api.deps import SESSION_COOKIE, AppContext, ContextDep, get_caller
from services.api.errors import Unauthorized

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"

#: How long a session cookie lives; the token inside may be revoked sooner
#: (then the next page load is sent back to the sign-in form).
SESSION_MAX_AGE_S = 12 * 3600

#: Where signing in lands when no (safe) ``next`` was given.
HOME = "/dashboard"

#: Our own scripts, styles and API only. ``img-src`` also allows other hosts:
#: an S3 artifact is a 307 to a presigned URL on the store's host.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: https: http:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

#: Static files are revalidated on every load (ETag / Last-Modified answer 304):
#: there is no build step adding hashes to their names, so a deploy must show at once.
STATIC_CACHE_CONTROL = "no-cache"

#: The nav bar: (page, label, href).
NAV = [
    ("runs", "Runs", "/dashboard/runs"),
    ("leaderboard", "Leaderboard", "/dashboard/leaderboard"),
    ("sweeps", "Sweeps", "/dashboard/sweeps"),
    ("fleet", "Fleet", "/dashboard/fleet"),
    ("failures", "Failures", "/dashboard/failures"),
]
# Pages reached from another one are shown under that one in the nav.
NAV_PARENT = {"run": "runs", "compare": "runs", "sweep": "sweeps"}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


class DashboardStatic(StaticFiles):
    """The dashboard's scripts and styles, with cache and sniffing headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file at ``path`` (or a 304/404), with Cache-Control and nosniff."""
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = STATIC_CACHE_CONTROL
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install(app: FastAPI) -> None:
    """Add the dashboard's routes and its static files to ``app``."""
    app.mount("/dashboard/static", DashboardStatic(directory=STATIC_DIR), name="dashboard-static")
    app.include_router(router)


def _template(name: str) -> Template:
    return Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


def _safe_next(value: str | None) -> str:
    """``value`` if it is a dashboard path on this server, else :data:`HOME` (no open redirect)."""
    if not value:
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value:
        return HOME
    if parts.path != HOME and not parts.path.startswith(HOME + "/"):
        return HOME
    if parts.path.startswith("/dashboard/static") or parts.path.startswith("/dashboard/log"):
        return HOME
    return value


def _same_origin(request: Request) -> bool:
    """False when the browser says the form came from another site (Origin header)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # No Origin: not a cross-site browser form (browsers send one on POST).
        # "null" comes from privacy-sensitive contexts; refuse those too.
        return origin is None
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


async def _check(request: Request, context: AppContext, secret: str | None) -> Caller | None:
    """The caller for ``secret`` (or, without one, for the request's own credentials)."""
    credentials = (
        HTTPAuthorizationCredentials(scheme="Bearer", credentials=secret) if secret else None
    )
    try:
        return await get_caller(request, context, credentials)
    except Unauthorized:
        return None


async def _page_caller(request: Request, context: ContextDep) -> Caller | None:
    """Who is looking at a page: the Authorization header if sent, else the session cookie."""
    header = request.headers.get("authorization")
    if header is None:
        # get_caller reads the cookie itself (GET/HEAD only).
        return await _check(request, context, None)
    scheme, secret = get_authorization_scheme_param(header)
    if scheme.lower() != "bearer" or not secret:
        return None
    return await _check(request, context, secret)


def _nav(page: str) -> str:
    current = NAV_PARENT.get(page, page)
    links = []
    for name, label, href in NAV:
        extra = ' class="active" aria-current="page"' if name == current else ""
        links.append(f'<a href="{html.escape(href)}" data-nav="{name}"{extra}>{label}</a>')
    return "".join(links)


def _login_redirect(request: Request, clear: bool) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/dashboard/login?next={quote(target, safe='')}", 303)
    response.headers["Cache-Control"] = "no-store"
    if clear:
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _page(
    request: Request,
    context: ContextDep,
    page: str,
    title: str,
    data: dict[str, str] | None = None,
) -> Response:
    """A page shell for an admin; the sign-in form for no one; a 403 for a project token."""
    caller = await _page_caller(request, context)
    if caller is None:
        return _login_redirect(request, clear=SESSION_COOKIE in request.cookies)
    if not caller.is_admin:
        return _message(
            403,
            "Admin token required",
            "This token belongs to one project; the dashboard spans every project "
            "and needs an admin token.",
        )
    attributes = "".join(
        f' data-{name}="{html.escape(value, quote=True)}"' for name, value in (data or {}).items()
    )
    body = _template("page.html").substitute(
        title=html.escape(title), page=html.escape(page), data=attributes, nav=_nav(page)
    )
    return _html(body)


def _message(status: int, title: str, message: str) -> HTMLResponse:
    body = _template("message.html").substitute(
        title=html.escape(title), message=html.escape(message)
    )
    return _html(body, status)


def _login_form(status: int = 200, error: str | None = None, next_url: str = HOME) -> HTMLResponse:
    shown = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = _template("login.html").substitute(
        error=shown, next=html.escape(_safe_next(next_url), quote=True)
    )
    return _html(body, status)


@router.get("/login")
async def login_form(next: str | None = None) -> HTMLResponse:
    """The sign-in form: paste an admin token."""
    return _login_form(next_url=_safe_next(next))


@router.post("/login")
async def login(request: Request, context: ContextDep) -> Response:
    """Check the pasted token; an admin token becomes the session cookie (303 to the dashboard).

    A token that is unknown or revoked is a 401, a project token a 403; both
    show the form again with the reason.
    """
    if not _same_origin(request):
        return _message(403, "Sign-in refused", "The form was posted from another site.")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        return _login_form(415, "Send the sign-in form as application/x-www-form-urlencoded.")
    try:
        form = parse_qs((await request.body()).decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return _login_form(400, "The form could not be read.")
    token = (form.get("token") or [""])[0].strip()
    next_url = _safe_next((form.get("next") or [""])[0])
    if not token:
        return _login_form(401, "Paste an admin token.", next_url)
    caller = await _check(request, context, token)
    if caller is None:
        return _login_form(401, "Unknown or revoked token.", next_url)
    if not caller.is_admin:
        return _login_form(
            403,
            f"That is a token of project {caller.project!r}; the dashboard needs an admin token.",
            next_url,
        )
    response = RedirectResponse(next_url, status_code=303)
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_MAX_AGE_S,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Forget the session cookie and go back to the sign-in form."""
    if not _same_origin(request):
        return _message(403, "Sign-out refused", "The form was posted from another site.")
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.headers["Cache-Control"] = "no-store"
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("")
async def home(request: Request, context: ContextDep) -> Response:
    """The runs page (the dashboard's home)."""
    return await _page(request, context, "runs", "Runs")


@router.get("/runs")
async def runs(request: Request, context: ContextDep) -> Response:
    """Runs: filters, sort by any final or best metric, live progress, pick runs to compare."""
    return await _page(request, context, "runs", "Runs")


@router.get("/runs/{run_id}")
async def run(run_id: str, request: Request, context: ContextDep) -> Response:
    """One run: header, epochs, curves, LR finder, plots, interpretation, artifacts, events."""
    return await _page(request, context, "run", "Run", {"run-id": run_id})


@router.get("/compare")
async def compare(request: Request, context: ContextDep) -> Response:
    """Runs side by side: overlaid curves, the spec fields that differ, final and best metrics."""
    return await _page(request, context, "compare", "Compare")


@router.get("/leaderboard")
async def leaderboard(request: Request, context: ContextDep) -> Response:
    """Runs ranked by the best value of a metric, for a dataset or a sweep."""
    return await _page(request, context, "leaderboard", "Leaderboard")


@router.get("/fleet")
async def fleet(request: Request, context: ContextDep) -> Response:
    """Workers and queues: GPUs, heartbeats, current runs, depths, why runs wait."""
    return await _page(request, context, "fleet", "Fleet")


@router.get("/failures")
async def failures(request: Request, context: ContextDep) -> Response:
    """Failed runs grouped by reason."""
    return await _page(request, context, "failures", "Failures")


@router.get("/sweeps")
async def sweeps(request: Request, context: ContextDep) -> Response:
    """Every sweep and where its trials are."""
    return await _page(request, context, "sweeps", "Sweeps")


@router.get("/sweeps/{sweep_id}")
async def sweep(sweep_id: str, request: Request, context: ContextDep) -> Response:
    """One sweep: its trials, their values and states, links to its leaderboard and compare."""
    return await _page(request, context, "sweep", "Sweep", {"sweep-id": sweep_id})
