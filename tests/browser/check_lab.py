"""End-to-end check of ``make lab`` in a real browser (not part of ``make test``: it needs chromium).

Starts ``make lab`` exactly as a user does (no token given: the Makefile draws one), reads the URL it
prints, checks that the server accepts that URL's token (and refuses another), opens the URL in headless
chromium, and checks that JupyterLab lands on notebook 00, that Run All finishes without a traceback and
renders figures, and that the bias sliders and the prompt panel redraw their images. Writes a screenshot to
``reports/lab.png``. The only settings it adds are in the environment: quick mode, and a fresh Jupyter
configuration folder (no saved workspace, no news pop-up).

    apt-get install -y chromium && .venv/bin/pip install playwright
    .venv/bin/python tests/browser/check_lab.py            # make lab, on its default port
    .venv/bin/python tests/browser/check_lab.py --port 8899  # PORT=8899 make lab
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the visible notebook only
IDLE = f'{PANEL} .jp-Notebook-ExecutionIndicator[data-status="idle"]'
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
URL_LINE = re.compile(r"^JupyterLab: (http://\S+)$")


class Lab:
    """``make lab`` running in its own process group, its output collected line by line."""

    def __init__(self, port: int | None) -> None:
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
        env.pop("LAB_TOKEN", None)  # make reads the environment too: the token must be the Makefile's own
        command = ["make", "lab"] + ([f"PORT={port}"] if port is not None else [])
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would stall the server

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def printed_url(self, timeout: float = 600) -> str:
        """The URL ``make lab`` prints (a fresh machine installs first, hence the long wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := URL_LINE.match(line):
                    return match.group(1)
            if self.process.poll() is not None:
                raise SystemExit(f"make lab exited with {self.process.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.2)
        raise SystemExit("make lab printed no URL within 10 minutes:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def _status(base: str, token: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _wait_until_served(lab: Lab, base: str, token: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _status(base, token) == 200:
                return
        except OSError:
            pass
        if lab.process.poll() is not None:
            raise SystemExit(f"make lab exited with {lab.process.returncode}:\n" + "\n".join(lab.lines))
        time.sleep(0.5)
    raise SystemExit(f"the server never accepted the printed token within {timeout:.0f} s:\n" + "\n".join(lab.lines))


def _check(page, url: str) -> list[str]:
    results = []
    # The URL exactly as make lab printed it. A wrong token would land on the login page, with no notebook.
    # (A fresh JUPYTER_CONFIG_DIR has no saved workspace to restore other tabs from.)
    page.goto(url)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None, help="passed as PORT=... (default: the Makefile's)")
    args = parser.parse_args(argv)
    # JupyterLab autosaves what it runs: keep the committed notebook (outputs stripped) as it was.
    notebook = ROOT / "notebooks" / "00_toy_world.ipynb"
    committed = notebook.read_bytes()
    lab = Lab(args.port)
    try:
        url = lab.printed_url()
        parts = urlsplit(url)
        base, token = f"{parts.scheme}://{parts.netloc}", parse_qs(parts.query)["token"][0]
        print("make lab printed:", url)
        _wait_until_served(lab, base, token)
        print("ok: the server accepts the printed token (HTTP 200 on /api/status)")
        refused = _status(base, token + "x")
        assert refused == 403, f"the server answered {refused} to a wrong token, not 403"
        print("ok: the server refuses another token (HTTP 403)")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                for line in _check(page, url):
                    print("ok:", line)
            finally:
                (ROOT / "reports").mkdir(exist_ok=True)
                page.screenshot(path=str(ROOT / "reports" / "lab.png"))
                browser.close()
    finally:
        lab.stop()
        if notebook.read_bytes() != committed:
            notebook.write_bytes(committed)
            print("restored notebooks/00_toy_world.ipynb, which JupyterLab had autosaved with outputs")
    print("screenshot: reports/lab.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
