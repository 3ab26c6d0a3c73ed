"""The dashboard in a real browser against the live stack: sign in, then every page on real runs.

Headless Chromium is Debian's ``/usr/bin/chromium`` (``scripts/browser.sh``
installs it), driven by the Python ``playwright`` package with
``executable_path``: no ``playwright install``, nothing downloaded. Each page
is checked for what it must show (spec differences and one curve per run on
Compare, loaded plot images and the LR-finder chart on a run, the live workers
on Fleet, ...), for JavaScript errors and CSP violations, and photographed:
the screenshots land in a pytest tmp folder and in /tmp/fitfleet-screenshots/.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.e2e.stack import LiveStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
LATEST_SCREENSHOTS = Path("/tmp/fitfleet-screenshots")

#: Headless, no GPU, and nothing that talks to the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

READY_TIMEOUT_MS = 30_000
RUNS_TIMEOUT_MS = 300_000


@dataclass
class Shots:
    """Where screenshots go: a pytest tmp folder, mirrored into /tmp/fitfleet-screenshots/."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    def take(self, page: Any, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        LATEST_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, LATEST_SCREENSHOTS / path.name)
        self.taken.append(path)
        return path


@pytest.fixture(scope="module")
def shots(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Shots]:
    """The screenshot folder; its path is written to the terminal at the end."""
    shots = Shots(tmp_path_factory.mktemp("dashboard-screenshots"))
    if LATEST_SCREENSHOTS.exists():
        shutil.rmtree(LATEST_SCREENSHOTS)
    yield shots
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\ndashboard screenshots ({len(shots.taken)}): {shots.folder} "
                f"(also {LATEST_SCREENSHOTS})"
            )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under playwright; a failure (never a skip) when it is missing."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/browser.sh (apt-get install chromium); "
            "the dashboard's browser tests never download a browser"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives each run a fresh temporary profile (user-data dir).
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


class Tab:
    """A page in its own browser context, recording console errors and failed requests."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.base_url = base_url
        self.context = browser.new_context(
            base_url=base_url, viewport={"width": 1440, "height": 1000}
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(READY_TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda msg: (
                self.errors.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error"
                else None
            ),
        )
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def sign_in(self, token: str) -> Any:
        """Fill the sign-in form; the response of the form's POST."""
        self.page.goto("/dashboard/login")
        self.page.fill("#token", token)
        with self.page.expect_navigation() as navigation:
            self.page.click("button[type=submit]")
        return navigation.value

    def open(self, path: str, shots: Shots, name: str) -> Any:
        """Go to a dashboard page, wait until its module has drawn it and its images
        have loaded, and photograph it (before any assertion, so a failure has a picture).
        """
        self.page.goto(path)
        self.page.wait_for_selector("body[data-ready]", state="attached")
        self.page.wait_for_function(
            "() => [...document.images].every(i => i.complete)", timeout=READY_TIMEOUT_MS
        )
        # decoded, so a full-page screenshot paints images outside the viewport too
        self.page.evaluate(
            "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
        )
        shots.take(self.page, name)
        ready = self.page.get_attribute("body", "data-ready")
        if ready != "true":
            shown = self.page.inner_text("#content")
            raise AssertionError(f"{path} did not render: {shown}\n{self.errors}")
        return self.page

    def no_errors(self) -> None:
        assert not self.errors, "\n".join(self.errors)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, live_stack: LiveStack) -> Iterator[Tab]:
    """A fresh context (no cookies) on the live server."""
    tab = Tab(browser, live_stack.url)
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture
def admin_tab(tab: Tab, live_stack: LiveStack) -> Tab:
    """A context signed in through the form with the admin token."""
    response = tab.sign_in(live_stack.admin_token)
    assert response.status == 200, response.status  # the dashboard, after the 303
    assert tab.page.url.rstrip("/").endswith("/dashboard"), tab.page.url
    return tab


def _numbers(values: list[str | None]) -> list[float | None]:
    return [float(v) if v not in (None, "") else None for v in values]


def test_a_project_token_or_an_unknown_one_is_refused(
    tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    page = tab.page
    page.goto("/dashboard/fleet")
    assert urlpath(page.url) == "/dashboard/login"  # no session: the sign-in form

    response = tab.sign_in(live_stack.project_token)
    assert response.status == 403
    assert "needs an admin token" in page.inner_text("[role=alert]")
    assert not [c for c in tab.context.cookies() if c["name"] == "fitfleet_session"]
    shots.take(page, "00-login-refused")

    response = tab.sign_in("ff_not_a_token")
    assert response.status == 401
    assert "Unknown or revoked" in page.inner_text("[role=alert]")

    page.goto("/dashboard/runs")
    assert urlpath(page.url) == "/dashboard/login"
    # (the browser logs the refused sign-ins' 403 and 401 as console errors: expected here)


def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_clears_it(
    admin_tab: Tab, shots: Shots
) -> None:
    cookies = [c for c in admin_tab.context.cookies() if c["name"] == "fitfleet_session"]
    assert len(cookies) == 1
    assert cookies[0]["httpOnly"] is True
    assert cookies[0]["sameSite"] == "Strict"
    page = admin_tab.page
    # HttpOnly: the page's own scripts cannot read the token
    assert "fitfleet_session" not in page.evaluate("document.cookie")
    with page.expect_navigation():
        page.click(".signout button")
    assert urlpath(page.url) == "/dashboard/login"
    assert not [c for c in admin_tab.context.cookies() if c["name"] == "fitfleet_session"]
    shots.take(page, "00-login")


def test_runs_page_sorted_by_best_error_rate(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    page = admin_tab.open(
        "/dashboard/runs?sort=best:error_rate&project=vision",
        shots,
        "01-runs-sorted-best-error_rate",
    )
    shown = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.runId)")
    assert set(live_stack.run_ids) <= set(shown), shown
    bests = _numbers(
        page.eval_on_selector_all(
            "tr[data-run-id]",
            "rows => rows.map(r => r.querySelector('[data-metric=error_rate]')?.dataset.best)",
        )
    )
    present = [b for b in bests if b is not None]
    assert present == sorted(present), bests
    assert bests[: len(present)] == present, "runs without the metric come last"
    assert page.input_value("#f-sort") == "best:error_rate"
    # progress bars, and a finished run's is full
    for run_id in live_stack.run_ids:
        row = page.locator(f"tr[data-run-id='{run_id}']")
        assert row.locator(".progress[aria-valuenow='100']").count() == 1
        assert "2/2 ep" in row.inner_text()

    # pick two runs: Compare is enabled only then
    button = page.locator("#compare-selected")
    assert button.is_disabled()
    for run_id in live_stack.run_ids[:2]:
        page.check(f"tr[data-run-id='{run_id}'] input[type=checkbox]")
    assert button.is_enabled()
    shots.take(page, "01-runs-selected")
    with page.expect_navigation():
        button.click()
    assert urlpath(page.url) == "/dashboard/compare"
    page.wait_for_selector("body[data-ready=true]")
    admin_tab.no_errors()


def test_runs_page_filters_by_state(admin_tab: Tab, live_stack: LiveStack, shots: Shots) -> None:
    page = admin_tab.open("/dashboard/runs?state=failed", shots, "02-runs-failed")
    shown = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.runId)")
    assert live_stack.failed_run_id in shown
    assert not set(live_stack.run_ids) & set(shown)
    assert page.input_value("#f-state") == "failed"
    admin_tab.no_errors()


def test_compare_shows_spec_differences_and_a_curve_per_run(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    ids = live_stack.run_ids
    page = admin_tab.open(f"/dashboard/compare?ids={','.join(ids)}", shots, "03-compare")
    paths = page.eval_on_selector_all(
        "#spec-differences tr[data-path]", "rows => rows.map(r => r.dataset.path)"
    )
    assert any(re.fullmatch(r"stages\.[0-9*]+\.max_lr", p) for p in paths), paths
    assert "data.batch_size" in paths, paths
    batch = page.locator("#spec-differences tr[data-path='data.batch_size'] td").all_inner_texts()
    assert sorted(batch) == ["32", "32", "64"], batch
    assert not any(p.startswith("model.") for p in paths), paths  # only what differs

    for metric in ("valid_loss", "train_loss", "error_rate", "accuracy"):
        chart = page.locator(f"#compare-charts figure[data-metric='{metric}']")
        assert chart.count() == 1, metric
        assert chart.locator("path.series").count() == len(ids), metric
        drawn = chart.locator("path.series").evaluate_all(
            "paths => paths.map(p => p.getTotalLength())"
        )
        assert all(length > 0 for length in drawn), (metric, drawn)

    assert page.locator("#metric-values tr[data-metric=error_rate][data-kind=best] td.hl").count()
    admin_tab.no_errors()


def test_run_page_shows_plots_lr_find_epochs_and_interpretation(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    run_id = live_stack.run_ids[0]
    page = admin_tab.open(f"/dashboard/runs/{run_id}", shots, "04-run")
    assert page.inner_text("#title") == "e2e-lr-1e-3"
    assert "succeeded" in page.inner_text("#run-header")

    plots = page.eval_on_selector_all(
        "#plots figure[data-artifact]", "figs => figs.map(f => f.dataset.artifact)"
    )
    for name in ("plots/show_batch.png", "plots/top_losses.png", "plots/confusion_matrix.png"):
        assert name in plots, plots
    # every <img> loaded (through the API's redirect to a presigned S3 URL)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#plots img')].every(i => i.complete)"
    )
    sizes = page.eval_on_selector_all(
        "#plots img", "imgs => imgs.map(i => [i.alt, i.naturalWidth])"
    )
    assert sizes and all(width > 0 for _, width in sizes), sizes

    lr_json = page.evaluate(
        f"fetch('/v1/experiments/{run_id}/lr-find').then(r => r.text())"
    )  # the same GET the page made, with the session cookie, for the messages below
    lr_chart = page.locator("#lr-find figure.chart")
    assert lr_chart.count() >= 1, lr_json
    assert lr_chart.first.locator("path.series").count() == 1, lr_json
    assert lr_chart.first.locator("svg text").filter(has_text="1e-").count() >= 2  # log x axis
    # The suggestion is marked when the API has it (stages.lr_suggestion, written by the worker).
    assert lr_chart.first.locator(".chart-mark").count() == 1, f"no LR suggestion: {lr_json}"
    assert "suggestion" in lr_chart.first.inner_text()

    epochs = page.locator("#epochs table tbody tr")
    assert epochs.count() == 2  # stage-1 and stage-2, one epoch each
    assert page.locator("#curves path.series").count() >= 2  # train and valid loss
    assert page.locator("#confusion-matrix tbody tr").count() == 2  # 3 vs 7
    assert page.locator("table.top-losses tbody tr").count() == 4
    assert page.locator("#findings").count() == 1
    assert page.locator("#events li.event").count() >= 2
    assert page.locator("#artifacts a[href*='/artifacts/report.json']").count() == 1
    admin_tab.no_errors()


def test_a_failed_run_shows_its_error(admin_tab: Tab, live_stack: LiveStack, shots: Shots) -> None:
    page = admin_tab.open(f"/dashboard/runs/{live_stack.failed_run_id}", shots, "05-run-failed")
    assert "failed" in page.inner_text("#run-header")
    assert "learning rate is too high" in page.inner_text("#run-error")
    admin_tab.no_errors()


def test_leaderboard_ranks_by_best_value(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    page = admin_tab.open(
        "/dashboard/leaderboard?dataset=digits&metric=error_rate", shots, "06-leaderboard"
    )
    shown = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.runId)")
    assert set(live_stack.run_ids) <= set(shown), shown
    ranks = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => +r.dataset.rank)")
    assert ranks == list(range(1, len(ranks) + 1))
    bests = [
        float(v)
        for v in page.eval_on_selector_all("[data-best]", "cells => cells.map(c => c.dataset.best)")
    ]
    assert len(bests) == len(ranks)
    assert bests == sorted(bests), bests  # error_rate: lowest best first
    assert page.input_value("#f-dataset") == "digits"
    assert page.input_value("#f-metric") == "error_rate"
    assert "best error_rate" in page.inner_text("#leaderboard-note")
    admin_tab.no_errors()


def test_fleet_lists_the_live_workers(admin_tab: Tab, live_stack: LiveStack, shots: Shots) -> None:
    page = admin_tab.open("/dashboard/fleet", shots, "07-fleet")
    listed = page.eval_on_selector_all(
        "tr[data-worker]", "rows => rows.map(r => [r.dataset.worker, r.dataset.state])"
    )
    states = dict(listed)
    for name in live_stack.worker_names:
        assert name in states, listed
        assert states[name] != "lost", listed
    assert live_stack.queue in page.eval_on_selector_all(
        "tr[data-queue]", "rows => rows.map(r => r.dataset.queue)"
    )
    admin_tab.no_errors()


def test_failures_page_groups_the_failed_run_by_reason(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    page = admin_tab.open("/dashboard/failures", shots, "08-failures")
    group = page.locator(".failure-group").filter(
        has=page.locator(f"a[data-run-id='{live_stack.failed_run_id}']")
    )
    assert group.count() == 1
    text = group.inner_text()
    assert "learning rate is too high" in text, text
    assert int(group.locator(".count").inner_text()) >= 1
    with page.expect_navigation():
        group.locator(f"a[data-run-id='{live_stack.failed_run_id}']").click()
    assert urlpath(page.url) == f"/dashboard/runs/{live_stack.failed_run_id}"
    shots.take(page, "08-failures-run")
    page.go_back()
    page.wait_for_selector("body[data-ready=true]")
    admin_tab.no_errors()


def test_a_sweep_its_trials_leaderboard_and_comparison(
    admin_tab: Tab, live_stack: LiveStack, shots: Shots
) -> None:
    """A sweep of two trials (a project of its own, so the other tests' listings stay as they were)."""
    base = live_stack.spec("e2e-dash-sweep", project="dash-sweeps", lr_find=False)
    with live_stack.client() as http:
        created = http.post(
            "/v1/sweeps",
            json={
                "name": "e2e-dash-sweep",
                "spec": base,
                "strategy": "grid",
                "parameters": {"data.batch_size": [16, 32]},
            },
        )
    assert created.status_code == 201, created.text
    sweep = created.json()
    trial_ids = [t["experiment_id"] for t in sweep["trials"]]

    # The runs page follows them live: no reload from here on, it refreshes itself.
    page = admin_tab.open("/dashboard/runs?project=dash-sweeps", shots, "09-runs-live")
    states = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.state)")
    assert len(states) == 2 and "succeeded" not in states, states
    page.wait_for_function(
        "n => document.querySelectorAll('tr[data-state=succeeded]').length === n",
        arg=len(trial_ids),
        timeout=RUNS_TIMEOUT_MS,
    )
    assert page.locator(".progress[aria-valuenow='100']").count() == 2
    shots.take(page, "09-runs-live-finished")
    for run_id in trial_ids:
        assert live_stack.wait_finished(run_id)["state"] == "succeeded", live_stack.logs()

    page = admin_tab.open("/dashboard/sweeps", shots, "10-sweeps")
    assert page.locator(f"a[href='/dashboard/sweeps/{sweep['id']}']").count() == 1

    page = admin_tab.open(f"/dashboard/sweeps/{sweep['id']}", shots, "10-sweep-trials")
    rows = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.runId)")
    assert sorted(rows) == sorted(trial_ids)
    text = page.inner_text("table.trials")
    assert "data.batch_size" in text and "succeeded" in text, text

    with page.expect_navigation():
        page.click("a[href^='/dashboard/leaderboard?sweep=']")
    page.wait_for_selector("body[data-ready=true]")
    ranked = page.eval_on_selector_all("tr[data-run-id]", "rows => rows.map(r => r.dataset.runId)")
    assert sorted(ranked) == sorted(trial_ids)
    shots.take(page, "11-sweep-leaderboard")

    page = admin_tab.open(f"/dashboard/compare?sweep={sweep['id']}", shots, "12-sweep-compare")
    paths = page.eval_on_selector_all(
        "#spec-differences tr[data-path]", "rows => rows.map(r => r.dataset.path)"
    )
    assert "data.batch_size" in paths, paths
    chart = page.locator("#compare-charts figure[data-metric='valid_loss'] path.series")
    assert chart.count() == 2
    admin_tab.no_errors()


def urlpath(url: str) -> str:
    """The path of ``url`` (no query)."""
    from urllib.parse import urlsplit

    return urlsplit(url).path
