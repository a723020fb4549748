"""End-to-end check of ``make lab`` in a real browser (not part of ``make test``: it needs chromium).

Starts ``make lab`` exactly as a user would (quick mode, fixed port and token), opens the URL it prints
in headless chromium, and checks that JupyterLab lands on notebook 00, that Run All finishes without a
traceback and renders figures, and that the bias sliders and the prompt panel redraw their images.
Writes a screenshot to ``reports/lab.png``.

    apt-get install -y chromium && .venv/bin/pip install playwright
    .venv/bin/python tests/browser/check_lab.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
PORT, TOKEN = 8899, "workbench-browser-check"
BASE = f"http://127.0.0.1:{PORT}"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the visible notebook only
IDLE = f'{PANEL} .jp-Notebook-ExecutionIndicator[data-status="idle"]'
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def _start_lab() -> subprocess.Popen:
    config_dir = Path(tempfile.mkdtemp()) / "jupyter"
    (config_dir / "labconfig").mkdir(parents=True)
    (config_dir / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = os.environ | {
        "WORKBENCH_QUICK": "1",
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(config_dir / "workspaces"),
    }
    lab = subprocess.Popen(
        ["make", "lab", f"PORT={PORT}", f"TOKEN={TOKEN}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600  # a fresh machine installs first
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{BASE}/api/status?token={TOKEN}", timeout=2) as response:
                if response.status == 200:
                    return lab
        except OSError:
            time.sleep(1)
        if lab.poll() is not None:
            raise SystemExit(f"make lab exited with {lab.returncode}:\n{lab.stdout.read()}")
    raise SystemExit("make lab did not answer within 10 minutes")


def _check(page) -> list[str]:
    results = []
    # The server's root, as in the URL Jupyter prints: make lab's default URL must lead to notebook 00.
    # (A fresh JUPYTER_CONFIG_DIR has no saved workspace to restore other tabs from.)
    page.goto(f"{BASE}/?token={TOKEN}")
    page.wait_for_selector(f"{PANEL} .jp-CodeCell", timeout=120_000)
    title = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel").first.inner_text()
    assert title == "00_toy_world.ipynb", f"JupyterLab opened {title!r}, not notebook 00"
    results.append(f"opens on {title}")
    page.wait_for_selector(IDLE, timeout=120_000)
    page.wait_for_function("() => /Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText || '')")
    cells = page.locator(f"{PANEL} .jp-CodeCell").count()
    start = time.monotonic()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    page.wait_for_function(
        """(panel) => {
            const prompts = [...document.querySelectorAll(panel + ' .jp-CodeCell .jp-InputArea-prompt')]
                .map(e => e.textContent);
            if (prompts.some(t => t.includes('*'))) return false;
            const failed = [...document.querySelectorAll(
                panel + ' .jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')]
                .some(e => e.innerText.includes('Traceback'));
            return failed || prompts.every(t => /\\[\\d+\\]/.test(t));
        }""",
        arg=PANEL,
        timeout=600_000,
    )
    page.wait_for_selector(IDLE)
    stderr = page.locator(f'{PANEL} .jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')
    tracebacks = [t for t in stderr.all_inner_texts() if "Traceback" in t]
    assert not tracebacks, "a cell failed:\n" + tracebacks[0]
    images = page.locator(f"{PANEL} .jp-OutputArea img").count()
    assert images >= 5, f"only {images} figures rendered"
    results.append(f"Run All: {cells} code cells, no traceback, {images} images, {time.monotonic() - start:.0f} s")

    bias = page.locator(f"{PANEL} .widget-vbox", has_text="Attribute bias").first
    before = bias.locator(".widget-output img").first.get_attribute("src")
    bias.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowDown")
    _wait_for_new_image(page, bias, before)
    results.append("bias slider redraws the sample grid")

    prompt = page.locator(f"{PANEL} .widget-vbox", has_text="guidance").last
    before = prompt.locator(".widget-output img").first.get_attribute("src")
    prompt.locator("input[type=text]").first.fill("a large blue square")
    prompt.locator("button", has_text="Run").first.click()
    _wait_for_new_image(page, prompt, before)
    results.append("prompt panel draws new samples for a typed prompt")
    return results


def _wait_for_new_image(page, widget, before: str | None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        image = widget.locator(".widget-output img").first
        if image.count() and image.get_attribute("src") not in (None, before):
            return
        page.wait_for_timeout(250)
    raise AssertionError("the widget's image did not change within 2 minutes")


def main() -> int:
    lab = _start_lab()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                for line in _check(page):
                    print("ok:", line)
            finally:
                (ROOT / "reports").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "reports" / "lab.png"))
                browser.close()
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=30)
    print("screenshot: reports/lab.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
