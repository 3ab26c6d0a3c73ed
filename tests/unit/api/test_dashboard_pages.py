"""The dashboard's server side: sign-in, the session cookie and its CSRF rule, redirects, CSP, static files.

The pages' JavaScript runs in a real browser in
tests/integration/e2e/test_dashboard_browser.py; here the app runs under
TestClient on SQLite.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from services.api.app import create_app
from services.api.dashboard.routes import CSP, STATIC_DIR, TEMPLATE_DIR
from services.api.deps import SESSION_COOKIE
from services.api.tokens import create_token
from shared.db.base import utcnow
from shared.db.models import SqlApiToken
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.settings import Settings
from tests.rows import add_queued_run

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = STATIC_DIR.parent

PAGES = [
    "/dashboard",
    "/dashboard/runs",
    "/dashboard/runs/exp_123",
    "/dashboard/compare?ids=a,b",
    "/dashboard/leaderboard?dataset=digits&metric=error_rate",
    "/dashboard/fleet",
    "/dashboard/failures",
    "/dashboard/sweeps",
    "/dashboard/sweeps/swp_1",
]


@dataclass
class Dash:
    client: TestClient
    engine: Engine
    admin: str
    admin_id: str
    project: str

    def cookie(self, secret: str) -> dict[str, str]:
        return {"Cookie": f"{SESSION_COOKIE}={secret}"}

    def bearer(self, secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def login(self, token: str, **extra: str) -> object:
        return self.client.post(
            "/dashboard/login",
            data={"token": token, **extra},
            follow_redirects=False,
        )

    def revoke(self, token_id: str) -> None:
        with session_scope(self.engine) as session:
            session.execute(
                update(SqlApiToken).where(SqlApiToken.id == token_id).values(revoked_at=utcnow())
            )


def _settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    upgrade(url)
    return Settings(
        database_url=url,
        home=tmp_path,
        artifacts_url=(tmp_path / "artifacts").as_uri(),
        publish_on_submit=False,
        auth_cache_s=0.0,  # a revocation shows at once
    )


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dash]:
    settings = _settings(tmp_path)
    engine = make_engine(settings.database_url)
    with session_scope(engine) as session:
        admin_id, admin = create_token(session, None, admin=True)
        _, project = create_token(session, "vision")
    try:
        with TestClient(create_app(settings)) as client:
            yield Dash(client, engine, admin, admin_id, project)
    finally:
        engine.dispose()


def _set_cookie(response: object) -> str:
    headers = response.headers  # type: ignore[attr-defined]
    cookies = [v for k, v in headers.multi_items() if k.lower() == "set-cookie"]
    assert len(cookies) == 1, cookies
    return str(cookies[0])


def _attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    attrs = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        attrs[key.lower()] = value
    return attrs


# --- sign-in ---------------------------------------------------------------


def test_login_form_is_a_plain_form_under_the_csp(dash: Dash) -> None:
    response = dash.client.get("/dashboard/login")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
    body = response.text
    assert '<form method="post" action="/dashboard/login"' in body
    assert 'name="token"' in body
    assert "<script" not in body  # the form needs no script at all


def test_csp_allows_only_own_scripts_and_presigned_images() -> None:
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no CDN
    assert directives["style-src"] == "'self'"
    # artifacts on S3 are a redirect to a presigned URL on the store's host
    assert directives["img-src"].split() == ["'self'", "data:", "https:", "http:"]
    assert directives["frame-ancestors"] == "'none'"


def test_an_admin_token_becomes_an_httponly_strict_session_cookie(dash: Dash) -> None:
    response = dash.login(f"  {dash.admin}\n")
    assert response.status_code == 303  # type: ignore[attr-defined]
    assert response.headers["location"] == "/dashboard"  # type: ignore[attr-defined]
    cookie = _set_cookie(response)
    assert cookie.startswith(f"{SESSION_COOKIE}={dash.admin};")
    attrs = _attributes(cookie)
    assert "httponly" in attrs
    assert attrs["samesite"].lower() == "strict"
    assert attrs["path"] == "/"
    assert "secure" not in attrs  # plain http (a test client); https below

    page = dash.client.get("/dashboard", headers=dash.cookie(dash.admin), follow_redirects=False)
    assert page.status_code == 200
    assert 'data-page="runs"' in page.text


def test_the_cookie_is_secure_over_https(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    engine = make_engine(settings.database_url)
    with session_scope(engine) as session:
        _, admin = create_token(session, None, admin=True)
    try:
        with TestClient(create_app(settings), base_url="https://testserver") as client:
            response = client.post(
                "/dashboard/login", data={"token": admin}, follow_redirects=False
            )
    finally:
        engine.dispose()
    assert response.status_code == 303
    assert "secure" in _attributes(_set_cookie(response))


def test_a_project_token_is_refused_with_403_and_the_form_again(dash: Dash) -> None:
    response = dash.login(dash.project)
    assert response.status_code == 403  # type: ignore[attr-defined]
    assert "set-cookie" not in response.headers  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    assert "needs an admin token" in text
    assert 'name="token"' in text
    assert "project &#x27;vision&#x27;" in text  # escaped


@pytest.mark.parametrize("token", ["ff_not_a_real_token", "", "   "])
def test_an_unknown_token_is_refused_with_401(dash: Dash, token: str) -> None:
    response = dash.login(token)
    assert response.status_code == 401  # type: ignore[attr-defined]
    assert "set-cookie" not in response.headers  # type: ignore[attr-defined]
    assert 'role="alert"' in response.text  # type: ignore[attr-defined]


def test_a_revoked_admin_token_is_refused_with_401(dash: Dash) -> None:
    dash.revoke(dash.admin_id)
    response = dash.login(dash.admin)
    assert response.status_code == 401  # type: ignore[attr-defined]
    assert "Unknown or revoked" in response.text  # type: ignore[attr-defined]


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(dash: Dash) -> None:
    back = dash.login(dash.admin, next="/dashboard/runs/exp_1?x=1")
    assert back.headers["location"] == "/dashboard/runs/exp_1?x=1"  # type: ignore[attr-defined]
    for evil in [
        "https://evil.example/",
        "//evil.example/dashboard",
        "/\\evil.example",
        "/v1/experiments",
        "/dashboardx",
        "/dashboard/static/app.js",
    ]:
        response = dash.login(dash.admin, next=evil)
        assert response.headers["location"] == "/dashboard", evil  # type: ignore[attr-defined]


def test_a_sign_in_posted_from_another_site_is_refused(dash: Dash) -> None:
    response = dash.client.post(
        "/dashboard/login",
        data={"token": dash.admin},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    same = dash.client.post(
        "/dashboard/login",
        data={"token": dash.admin},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert same.status_code == 303


def test_sign_out_clears_the_cookie(dash: Dash) -> None:
    response = dash.client.post(
        "/dashboard/logout", headers=dash.cookie(dash.admin), follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login"
    cookie = _set_cookie(response)
    assert cookie.startswith(f'{SESSION_COOKIE}="";') or cookie.startswith(f"{SESSION_COOKIE}=;")
    assert _attributes(cookie).get("max-age") == "0"


# --- pages -----------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_go_to_the_sign_in_form(dash: Dash, path: str) -> None:
    response = dash.client.get(path, follow_redirects=False)
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert location.path == "/dashboard/login"
    assert parse_qs(location.query)["next"] == [path]


@pytest.mark.parametrize("path", PAGES)
def test_pages_for_an_admin_by_cookie_or_bearer(dash: Dash, path: str) -> None:
    for headers in (dash.cookie(dash.admin), dash.bearer(dash.admin)):
        response = dash.client.get(path, headers=headers, follow_redirects=False)
        assert response.status_code == 200, (path, headers)
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        body = response.text
        assert '<script type="module" src="/dashboard/static/app.js"></script>' in body
        assert 'action="/dashboard/logout"' in body


@pytest.mark.parametrize("path", PAGES)
def test_pages_refuse_a_project_token_with_403(dash: Dash, path: str) -> None:
    for headers in (dash.cookie(dash.project), dash.bearer(dash.project)):
        response = dash.client.get(path, headers=headers, follow_redirects=False)
        assert response.status_code == 403, (path, headers)
        assert "admin token" in response.text


def test_a_bad_header_or_a_revoked_cookie_goes_back_to_sign_in(dash: Dash) -> None:
    for headers in ({"Authorization": "Basic abc"}, dash.bearer("ff_nope")):
        response = dash.client.get("/dashboard", headers=headers, follow_redirects=False)
        assert response.status_code == 303
    dash.revoke(dash.admin_id)
    response = dash.client.get(
        "/dashboard", headers=dash.cookie(dash.admin), follow_redirects=False
    )
    assert response.status_code == 303
    # the dead cookie is dropped, so the form does not loop on it
    assert _attributes(_set_cookie(response)).get("max-age") == "0"


def test_path_values_are_escaped_into_the_shell(dash: Dash) -> None:
    response = dash.client.get(
        "/dashboard/runs/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        headers=dash.bearer(dash.admin),
    )
    assert response.status_code == 200
    assert "<img src=x" not in response.text
    assert 'data-run-id="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in response.text


def test_the_nav_marks_the_current_page(dash: Dash) -> None:
    response = dash.client.get("/dashboard/runs/exp_1", headers=dash.bearer(dash.admin))
    assert re.search(r'<a href="/dashboard/runs" data-nav="runs" class="active"', response.text)
    fleet = dash.client.get("/dashboard/fleet", headers=dash.bearer(dash.admin))
    assert re.search(r'data-nav="fleet" class="active"', fleet.text)


# --- the session cookie on the JSON API: reads only (CSRF) -------------------


def test_the_cookie_authenticates_api_reads(dash: Dash) -> None:
    for path in ("/v1/experiments", "/v1/admin/workers", "/v1/admin/queues"):
        response = dash.client.get(path, headers=dash.cookie(dash.admin))
        assert response.status_code == 200, path
    assert dash.client.get("/v1/experiments").status_code == 401
    assert (
        dash.client.get("/v1/admin/workers", headers=dash.cookie(dash.project)).status_code == 403
    )
    assert dash.client.head("/v1/experiments", headers=dash.cookie(dash.admin)).status_code != 401


def test_the_cookie_never_authenticates_a_write(dash: Dash) -> None:
    with session_scope(dash.engine) as session:
        run_id = add_queued_run(session, project="vision")
    cookie = dash.cookie(dash.admin)
    cancel = dash.client.post(f"/v1/experiments/{run_id}/cancel", headers=cookie)
    assert cancel.status_code == 401
    submit = dash.client.post("/v1/experiments", headers=cookie, json={"version": 1})
    assert submit.status_code == 401
    # the same write with the token in the header is allowed
    ok = dash.client.post(f"/v1/experiments/{run_id}/cancel", headers=dash.bearer(dash.admin))
    assert ok.status_code == 200


def test_a_present_header_wins_over_the_cookie(dash: Dash) -> None:
    headers = {**dash.cookie(dash.admin), "Authorization": "Bearer ff_wrong"}
    assert dash.client.get("/v1/experiments", headers=headers).status_code == 401
    headers = {**dash.cookie(dash.admin), "Authorization": "Basic Zm9vOmJhcg=="}
    assert dash.client.get("/v1/experiments", headers=headers).status_code == 401


# --- static files --------------------------------------------------------------


def _static_files() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())


def test_static_files_are_served_with_cache_headers(dash: Dash) -> None:
    script = dash.client.get("/dashboard/static/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert script.headers["cache-control"] == "no-cache"
    assert script.headers["x-content-type-options"] == "nosniff"
    assert script.headers.get("etag")
    again = dash.client.get(
        "/dashboard/static/app.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert again.status_code == 304
    style = dash.client.get("/dashboard/static/dashboard.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")
    assert dash.client.get("/dashboard/static/nope.js").status_code == 404
    assert dash.client.get("/dashboard/static/%2e%2e/routes.py").status_code == 404


def test_every_module_import_resolves_to_a_served_file(dash: Dash) -> None:
    imports = re.compile(r"""(?:from|import)\s*\(?\s*['"](\.{1,2}/[^'"]+)['"]""")
    seen = 0
    for path in _static_files():
        if path.suffix != ".js":
            continue
        for target in imports.findall(path.read_text(encoding="utf-8")):
            resolved = (path.parent / target).resolve()
            assert resolved.is_file(), f"{path.name} imports {target}: missing"
            url = "/dashboard/static/" + resolved.relative_to(STATIC_DIR).as_posix()
            assert dash.client.get(url).status_code == 200, url
            seen += 1
    assert seen > 20
    pages = {p.stem for p in (STATIC_DIR / "pages").glob("*.js")}
    assert {"runs", "run", "compare", "leaderboard", "fleet", "failures", "sweep"} <= pages


def test_scripts_never_insert_html_or_reach_another_host() -> None:
    banned = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\(\s*['\"]on"
    )
    for path in _static_files():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".js":
            assert not banned.search(text), f"{path.name}: {banned.search(text)}"
        urls = re.findall(r"https?://[^\s'\"`)]+", text)
        assert all(u.startswith("http://www.w3.org/2000/svg") for u in urls), (path.name, urls)


def test_templates_have_no_inline_script_style_or_handlers() -> None:
    for path in TEMPLATE_DIR.glob("*.html"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), path.name
        assert not re.search(r"\sstyle=", text), path.name
        assert not re.search(r"\son[a-z]+=", text), path.name
        assert "<style" not in text, path.name
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name


def test_package_data_ships_every_dashboard_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["services.api.dashboard"]
    files = [
        p.relative_to(DASHBOARD).as_posix()
        for p in DASHBOARD.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    ]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
