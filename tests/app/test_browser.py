"""Notebook 05 in a real browser: JupyterLab on localhost, driven by Playwright in headless Chromium.

The test starts JupyterLab (token, ``--allow-root``, ``--no-browser``) on a free port over a temporary copy of
notebook 05, opens it in Debian's Chromium (``/usr/bin/chromium``, never a browser downloaded by Playwright),
runs all cells from the Run menu, waits for the three widgets to render, then types a new divergence, moves a
slider and clicks the buttons, and checks that each plot image really changed (its pixels, not only its
source). It also types an unknown divergence and checks the widget shows a message. No cell may raise or
write to stderr. A second test serves the same notebook as a Voila app and checks a widget responds there.
Screenshots go to ``test-artifacts/`` (ignored by git).

Needs ``playwright`` and ``voila`` (pip, the ``test`` extra) and ``chromium`` (apt). Without them the test is skipped,
except when $CI is set: there it fails, so CI cannot pass without running it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "05_teaching.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("OPDLAB_CHROMIUM", "/usr/bin/chromium")
# As root, in a sandbox without a network: no sandbox, no GPU, no calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# JupyterLab settings for a quiet, fully rendered notebook: no news toast, every cell attached to the DOM, and
# the notebook's kernel started without the "Select Kernel" dialog.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
        {"windowingMode": "none", "autoStartDefaultKernel": True},
}
TIMEOUT_MS = 90_000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium; never 'playwright install')"
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_browser() -> None:
    missing = _missing()
    if missing:
        (pytest.fail if _in_ci() else pytest.skip)(f"browser test needs {missing}; CI={os.environ.get('CI')!r}")


def _notebook_copy(tmp: Path) -> Path:
    """A folder under ``tmp`` holding a copy of notebook 05 (the server's root: nothing else is served)."""
    root = tmp / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    return root


@contextlib.contextmanager
def _serve(args: list[str], tmp: Path, ready_url: str | None = None, port: int | None = None, **env_overrides: str):
    """Run ``python -m <args>`` with Jupyter's config, data and runtime folders under ``tmp`` and figures
    written there too; yield once ``ready_url`` answers (or ``port`` accepts a connection); stop it after."""
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), OPDLAB_FIGURES=str(tmp / "figures"), **env_overrides)
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  cwd=tmp)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if ready_url is not None:
                        urllib.request.urlopen(ready_url, timeout=2).close()
                    else:
                        socket.create_connection(("127.0.0.1", port), timeout=2).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{args[0]} did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.3)
            yield
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a temporary folder holding a copy of notebook 05; yields (base url, token)."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    root = _notebook_copy(tmp)
    for name, values in LAB_SETTINGS.items():
        path = tmp / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    args = ["jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with _serve(args, tmp, f"{base}/api/status?token={token}", JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
                JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces")):
        yield base, token


@contextlib.contextmanager
def _chromium_page():
    """A fresh page in headless Debian Chromium (1400x1000); on failure a screenshot goes to test-artifacts/."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        try:
            yield page
        except BaseException:  # pytest.fail raises a BaseException
            page.screenshot(path=str(ARTIFACTS / "05_failure.png"))
            raise
        finally:
            browser.close()


def _type_divergence(page, widget: str, name: str) -> None:
    """Type ``name`` into the divergence box of ``widget`` (a combobox: the value is sent on Enter)."""
    box = page.locator(f"{widget} .opdlab-divergence input")
    box.fill(name)
    box.press("Enter")


def _image_png(page, widget: str) -> bytes:
    """A screenshot of the plot inside ``widget`` (a CSS selector), once its image has loaded."""
    image = page.locator(f"{widget} img.opdlab-figure")
    image.wait_for(state="visible")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image.screenshot()


def _settled_src(page, widget: str, quiet_s: float = 1.0, timeout_s: float = 30.0) -> str:
    """The plot's image source once it has stopped changing for ``quiet_s`` (a slider moved by ten key
    presses sends ten updates; comparing against one of the intermediate images would race)."""
    image = page.locator(f"{widget} img.opdlab-figure")
    src, since, deadline = image.get_attribute("src"), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise AssertionError(f"the plot in {widget} kept changing for {timeout_s} s")
        page.wait_for_timeout(200)
        now = image.get_attribute("src")
        if now != src:
            src, since = now, time.monotonic()
    return src


def _changed(page, widget: str, action, name: str) -> bytes:
    """Do ``action``; wait until the plot in ``widget`` gets a new image and settles; assert its pixels differ."""
    image = page.locator(f"{widget} img.opdlab-figure")
    before_src = _settled_src(page, widget)
    before = _image_png(page, widget)
    action()
    page.wait_for_function("([img, src]) => img.getAttribute('src') !== src", arg=[image.element_handle(), before_src],
                           timeout=30_000)
    _settled_src(page, widget)
    after = _image_png(page, widget)
    assert after != before, f"{name}: the plot in {widget} got a new source but the same pixels"
    (ARTIFACTS / f"05_{name}.png").write_bytes(after)
    return after


def _wait_for_kernel(base: str, token: str, timeout: float = 60.0) -> None:
    """Wait until the server has a session whose kernel is idle (the page's own indicator can say idle
    before any kernel is attached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as response:
            sessions = json.load(response)
        if any(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions):
            return
        time.sleep(0.3)
    pytest.fail(f"no idle kernel after {timeout:.0f} s; sessions: {sessions}")


def _all_cells_ran(page) -> None:
    """Wait until every code cell shows an execution count; fail with the visible error otherwise."""
    try:
        page.wait_for_function(
            """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                          .map(e => e.textContent.trim());
                       return p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t)); }""", timeout=TIMEOUT_MS)
    except Exception:
        errors = page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        pytest.fail(f"not every cell ran; prompts {prompts}; errors: {errors}")


EXPLORER, PLAYGROUND, RACE = (".opdlab-divergence-explorer", ".opdlab-categorical-playground",
                             ".opdlab-training-race")


def _no_errors_shown(page, container: str) -> None:
    stderr = page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    assert not stderr, f"cells wrote to stderr or raised: {stderr}"
    text = page.locator(container).inner_text()
    for sign in ("Traceback", "Error displaying widget", "Failed to load model"):
        assert sign not in text, re.findall(f".*{sign}.*", text)
    assert not page.errors, page.errors


def test_notebook_05_runs_and_its_widgets_respond_in_jupyterlab(lab):
    base, token = lab
    start = time.monotonic()
    with _chromium_page() as page:
        page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell")
        _wait_for_kernel(base, token)
        page.click('.lm-MenuBar-itemLabel:text-is("Run")')
        page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
        _all_cells_ran(page)
        for widget in (EXPLORER, PLAYGROUND, RACE):
            _image_png(page, widget)
        # 1. Type another divergence into the explorer.
        _changed(page, EXPLORER, lambda: _type_divergence(page, EXPLORER, "reverse_kl"), "explorer_reverse_kl")
        assert "reverse KL" in page.locator(EXPLORER).inner_text()
        # 2. Move the playground's temperature slider with the keyboard, then draw samples.
        handle = page.locator(f"{PLAYGROUND} .opdlab-temperature .noUi-handle")
        _changed(page, PLAYGROUND, lambda: (handle.focus(), [handle.press("ArrowLeft") for _ in range(10)]),
                 "playground_temperature")
        _changed(page, PLAYGROUND, lambda: page.click(f"{PLAYGROUND} button.opdlab-sample"), "playground_samples")
        # 3. Rerun the race on another divergence with the button.
        _type_divergence(page, RACE, "jsd")
        _changed(page, RACE, lambda: page.click(f"{RACE} button.opdlab-run"), "race_jsd")
        # 4. A bad name shows a message in the widget; nothing raises.
        _type_divergence(page, EXPLORER, "not_a_divergence")
        message = page.locator(f"{EXPLORER} .opdlab-message .opdlab-error")
        message.wait_for(state="visible", timeout=30_000)
        assert "unknown divergence" in message.inner_text()

        page.locator(EXPLORER).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "05_teaching_jupyterlab.png"))
        for widget in (EXPLORER, PLAYGROUND, RACE):
            page.locator(widget).screenshot(path=str(ARTIFACTS / f"05_widget_{widget.split('-', 1)[1]}.png"))
        _no_errors_shown(page, ".jp-Notebook")
    assert time.monotonic() - start < 120, "the browser test should stay under two minutes"


def test_notebook_05_as_a_voila_app(tmp_path):
    """``voila notebooks/05_teaching.ipynb`` (``make app``) serves the widgets without the notebook interface."""
    _require_browser()
    try:
        import voila  # noqa: F401
    except ImportError:
        (pytest.fail if _in_ci() else pytest.skip)("voila is not installed (pip install -e '.[test]')")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["voila", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1", "--Voila.port_retries=0",
            str(_notebook_copy(tmp_path) / NOTEBOOK.name)]
    with _serve(args, tmp_path, port=port), _chromium_page() as page:
        page.goto(base)  # Voila runs every cell before it sends the page
        for widget in (EXPLORER, PLAYGROUND, RACE):
            _image_png(page, widget)
        _changed(page, EXPLORER, lambda: _type_divergence(page, EXPLORER, "jsd"), "voila_explorer_jsd")
        page.screenshot(path=str(ARTIFACTS / "05_teaching_voila.png"))
        _no_errors_shown(page, "body")
