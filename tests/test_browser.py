"""Browser check (issue 17, point 7): what a person sees in the three UIs after one pipeline run.

Runs the retrain flow on the tiny test model against a real Prefect server, registers the
scheduled deployment, starts an MLflow server on the same store, then opens in headless Chromium:

- the Prefect deployment page: the cron schedule in words ("At 03:00 AM, only on Monday");
- the MLflow model version page: the `champion` alias and the base model;
- Data Docs: the validation page ("Status: Succeeded") and the index listing it with its success mark.

Screenshots go to reports/browser/ (shown in the README). Deselected unless `-m browser` names it;
`make browser-check` installs Playwright (the `browser` extra) and Debian's chromium, then runs it.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from components.ops import registry, tracking

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "reports" / "browser"
CHROMIUM = os.environ.get("GENCLS_CHROMIUM", "/usr/bin/chromium")
# a closed network refuses many of Chromium's background connections; none of them is needed
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCHEDULE_TEXT = "At 03:00 AM, only on Monday"  # cron "0 3 * * 1" as the Prefect UI words it
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 60_000  # a page's first load on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(name: str, cmd: list[str], env: dict, health_url: str, log_dir: Path, timeout: float = 240):
    """Start a server in its own process group, wait until health_url answers, stop the group at exit."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} server exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} server not healthy after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A temp project root (data/, checkpoints/, reports/, mlflow/) with the tiny dataset."""
    from test_flows import write_tiny_dataset

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    write_tiny_dataset(tmp_path / "data")
    return tmp_path


def check_and_shoot(page, name: str, locators: list, debug_dir: Path) -> Path:
    """Wait until every locator is visible, then screenshot the page to reports/browser/<name>
    (on failure the page goes to debug_dir/<name> and its text into the assertion message)."""
    from playwright.sync_api import expect

    try:
        for locator in locators:
            expect(locator).to_be_visible(timeout=TIMEOUT_MS)
    except AssertionError as exc:
        page.screenshot(path=str(debug_dir / name))
        raise AssertionError(f"{exc}\n{page.url} as shown (screenshot {debug_dir / name}):\n"
                             f"{page.inner_text('body')[:3000]}") from None
    try:
        page.wait_for_load_state("networkidle", timeout=15_000)  # late requests (icons, counts) settle
    except Exception:
        pass
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))
    from PIL import Image

    with Image.open(SHOTS / name) as img:  # 256 colours: a third of the size, the same to read
        small = img.convert("RGB").quantize(colors=256)
    small.save(SHOTS / name, optimize=True)
    return SHOTS / name


def test_uis_show_schedule_champion_and_validation(project, tiny_model_dir, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make browser-check` (installs the `browser` extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: run `make browser-check` (apt-get install chromium) or set GENCLS_CHROMIUM")
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_flows import tiny_overrides

    from flows.deploy import build_deployments, deployment_specs
    from flows.retrain import retrain

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    # the UI's API address comes from these settings, not from `prefect server start --port`
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(prefect_port), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    logs = tmp_path / "logs"
    logs.mkdir()
    params = yaml.safe_load((REPO / "conf" / "params.yaml").read_text(encoding="utf-8"))
    params["retrain"] = {**params.get("retrain", {}), "datasets": ["tiny"]}
    assert deployment_specs(params)[0]["cron"] == "0 3 * * 1", "SCHEDULE_TEXT assumes the Monday 03:00 cron"

    with ExitStack() as stack:
        # 1. Prefect server; the pipeline runs against it and the deployment is registered with it
        stack.enter_context(server("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                               "--port", str(prefect_port)],
                                   env, f"{prefect_url}/api/health", logs))
        with temporary_settings({PREFECT_API_URL: f"{prefect_url}/api"}):
            out = retrain("tiny", "quick", tiny_overrides(tiny_model_dir), {"limit": 6, "batch_size": 8},
                          evaluations=["gencls"])
            deployment_id = build_deployments(params)[0].apply()
        assert out["decision"]["promoted"], out["decision"]
        champion = registry.current_champion("tiny")
        base_model = champion.tags["base_model"]
        assert base_model
        docs_index = project / "reports" / "tiny" / "data_docs" / "index.html"
        assert docs_index.is_file()

        # 2. MLflow server on the store the pipeline wrote (started after it: one writer on the sqlite file)
        store = tracking.tracking_uri(project)
        artifacts = tracking.artifact_root(project).as_uri()
        stack.enter_context(server("mlflow", [str(bin_dir / "mlflow"), "server", "--backend-store-uri", store,
                                              "--default-artifact-root", artifacts, "--artifacts-destination",
                                              artifacts, "--host", "127.0.0.1", "--port",
                                              str(mlflow_port), "--workers", "1"],
                                   env, f"{mlflow_url}/health", logs))

        # 3. headless Chromium
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        page = browser.new_page(viewport=VIEWPORT)
        # MLflow opens its assistant panel on a first visit; a returning user's closed panel is the usual view
        page.add_init_script(f"if (location.port === '{mlflow_port}') {{"
                             "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                             "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'); }")
        page.set_default_timeout(TIMEOUT_MS)

        page.goto(f"{prefect_url}/deployments/deployment/{deployment_id}")
        check_and_shoot(page, "prefect-deployment.png",
                        [page.get_by_text("retrain-tiny").first, page.get_by_text(SCHEDULE_TEXT).first], logs)

        page.goto(f"{mlflow_url}/#/models/{registry.model_name('tiny')}/versions/{champion.version}")
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 1100})  # down to the base_model tag
        check_and_shoot(page, "mlflow-version.png",
                        [page.get_by_role("status", name="champion"),  # the alias badge "@ champion"
                         page.get_by_role("cell", name=base_model, exact=True)], logs)  # the base_model tag
        page.set_viewport_size(VIEWPORT)

        # Data Docs: the validation page (static HTML), then the index that lists it
        validation_page = next(docs_index.parent.glob("validations/gencls-tiny/*/*/gencls-tiny.html"))
        page.goto(validation_page.as_uri())
        check_and_shoot(page, "data-docs-validation.png",
                        [page.get_by_text("Expectation Suite: gencls-tiny"),
                         page.get_by_text(re.compile(r"Status:\s*Succeeded"))], logs)
        page.goto(docs_index.as_uri())
        check_and_shoot(page, "data-docs.png",
                        [page.locator("table tbody td", has_text="gencls-tiny").first,  # a row of this validation
                         page.locator("table tbody .ge-success-icon").first],  # its status: succeeded
                        logs)
