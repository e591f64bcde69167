"""The ipywidgets explorers, tested as a user meets them: JupyterLab in headless Chromium (issue 25).

A JupyterLab server is started from this environment (127.0.0.1, a free port, a random token), Chromium driven
by Playwright opens a notebook in it, runs it, moves each explorer's slider with the keyboard and checks that the
figure changes. The notebook opened is a scratch copy under runs/browser/ of the real notebook's own cells (its
setup, its parameters, the cells that compute the explorer's inputs, and the explorer cell itself), with a cell
that makes training short injected after the cell that defines it: the explorer code and the helper behind it are
the notebook's own, only the arrays are cheaper. Screenshots of every explorer before and after the move are saved
under runs/browser/. Chromium is the system's (Debian: `apt-get install chromium`; or WORKBOOK_CHROMIUM=/path);
without it, or without playwright, the test is skipped with the reason. Run alone with `pytest -m browser`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "runs" / "browser"
RESPONSE_LIMIT_S = 2.0   # issue 25 asks for under a second (measured: 0.2-0.4 s); the margin is for 2 busy cores


@dataclass
class Explorer:
    """How to open one notebook's explorer cheaply. Each entry of `cells` is a substring that picks exactly one
    code cell of the real notebook (kept in notebook order); `after` maps such a substring to code injected right
    after that cell (smaller parameters). `sliders` is how many sliders the explorer has (each is moved once)."""
    notebook: str
    cells: list[str]
    after: dict[str, str] = field(default_factory=dict)
    sliders: int = 1


# Every notebook with an ipywidgets explorer must be listed here (test_every_explorer_is_covered checks it).
EXPLORERS = {
    "01_toy_superposition.ipynb": Explorer(
        "01_toy_superposition.ipynb",
        cells=["import helpers", "FAST = True", "helpers.setup(", "DENSITIES_1 =", "sp.geometry_explorer("],
        # the §1 sweep as the notebook trains it, with 150 steps and one seed instead of 3000 steps and three
        after={"FAST = True": "N_SEEDS = 1", "helpers.setup(": 'TRAIN["steps"] = 150'},
        sliders=2),
}

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_CODE = re.compile(r"\bipywidgets\b|\binteract(ive|ive_output)?\(|_explorer\(")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _has_explorer(path: Path) -> bool:
    for c in _cells(path):
        if c["cell_type"] != "code":
            continue
        if WIDGET_CODE.search("".join(c["source"])):
            return True
        if any(WIDGET_MIME in o.get("data", {}) for o in c.get("outputs", [])):
            return True
    return False


def test_every_explorer_is_covered():
    """A notebook that shows a widget (or calls an *_explorer helper) must have an entry in EXPLORERS."""
    found = sorted(p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb") if _has_explorer(p))
    assert found, "no notebook with an explorer found: the detection is broken"
    missing = [n for n in found if n not in EXPLORERS]
    assert not missing, f"notebooks with an explorer that the browser test does not open: {missing}"
    stale = [n for n in EXPLORERS if not (NOTEBOOKS / n).exists()]
    assert not stale, f"EXPLORERS lists notebooks that do not exist: {stale}"


def scratch_notebook(spec: Explorer, kernel_check: str) -> Path:
    """runs/browser/<notebook>: the real notebook's chosen cells (outputs cleared), the injected cells, and a
    first cell that prints the kernel's environment."""
    nb = json.loads((NOTEBOOKS / spec.notebook).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    picked = []
    for key in spec.cells:
        hits = [c for c in code if key in "".join(c["source"])]
        assert len(hits) == 1, f"{spec.notebook}: {len(hits)} code cells contain {key!r} (need exactly one)"
        picked.append((code.index(hits[0]), key, hits[0]))
    cells = [_code(kernel_check)]
    for _, key, c in sorted(picked, key=lambda t: t[0]):
        cells.append(_code("".join(c["source"]), c["metadata"]))
        if key in spec.after:
            cells.append(_code(spec.after[key]))
    for i, c in enumerate(cells):
        c["id"] = f"browser-{i}"
    nb["cells"] = cells
    nb["nbformat"], nb["nbformat_minor"] = 4, max(nb.get("nbformat_minor", 5), 5)
    nb["metadata"].pop("widgets", None)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / spec.notebook
    path.write_text(json.dumps(nb, indent=1))
    return path


def _code(source: str, metadata: dict | None = None) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": dict(metadata or {}), "outputs": [],
            "source": source}


# --- the server and the browser ----------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in (os.environ.get("WORKBOOK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 (free port, random token), started from this environment in the repository
    root as `make lab` starts it; shut down (the whole process group) whatever the test's outcome."""
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        pytest.skip(f"no jupyter next to {sys.executable}")
    token, port = secrets.token_hex(16), _free_port()
    home = tmp_path_factory.mktemp("lab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBOOK_", "PYTEST_"))}
    env.pop("MPLBACKEND", None)            # a user's kernel draws inline; the tests' Agg would hide the figures
    # toy models this small train fastest on one thread (2 threads on 2 busy cores: 5x slower)
    env["WORKBOOK_THREADS"] = os.environ.get("WORKBOOK_THREADS", "1")
    env.update(JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')          # no "get notified about Jupyter news?" pop-up
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start (exit {proc.poll()}); see {OUT / 'jupyterlab.log'}")
            time.sleep(0.5)
        yield dict(base=base, token=token)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (it shuts its kernels down first), SIGKILL after 20 s; then anything left in its
    process group (a kernel) is killed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -c constraints.txt -e '.[dev]')")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set WORKBOOK_CHROMIUM=/path/to/chrome)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


# --- the test ---------------------------------------------------------------------------------------------

KERNEL_CHECK = ("import sys, helpers\n"
                "print('KERNEL-PREFIX', sys.prefix)\n"
                "print('HELPERS-FILE', helpers.__file__)")


def _wait_idle(page, timeout_s: float) -> None:
    """Until every code cell of the open notebook has run and its kernel is idle."""
    page.wait_for_function(
        """() => {
            const nb = window.jupyterapp.shell.currentWidget;
            if (!nb || !nb.content || !nb.sessionContext.session) return false;
            const k = nb.sessionContext.session.kernel;
            const cells = nb.content.widgets.filter(c => c.model.type === 'code');
            return k && k.status === 'idle' && cells.every(c => c.model.executionCount !== null);
        }""", timeout=timeout_s * 1000, polling=500)


def _figure_src(output) -> str | None:
    img = output.locator("img")
    return img.first.get_attribute("src") if img.count() else None


@pytest.mark.browser
@pytest.mark.parametrize("name", sorted(EXPLORERS))
def test_explorer_in_jupyterlab(name, browser, lab):     # browser first: no server started when it skips
    spec = EXPLORERS[name]
    path = scratch_notebook(spec, KERNEL_CHECK)
    stem = path.stem
    t0 = time.monotonic()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        rel = path.relative_to(ROOT).as_posix()
        page.goto(f"{lab['base']}/lab/tree/{rel}?token={lab['token']}&reset")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                               " && window.jupyterapp.shell.currentWidget.sessionContext"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.isReady",
                               timeout=90_000, polling=500)
        # The kernel the notebook gets is the one `make lab` gives: its name and the environment it runs in
        kernel = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name")
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        _wait_idle(page, timeout_s=150)
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        t_run = time.monotonic() - t0

        # No cell shows an error, in the page or in the saved notebook
        shown = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        tracebacks = [t for t in shown.all_inner_texts() if "Traceback" in t]
        assert not tracebacks, f"{name}: a cell shows an error:\n{tracebacks[0][:2000]}"
        time.sleep(0.5)
        saved = _cells(path)
        errors = [o for c in saved for o in c.get("outputs", []) if o["output_type"] == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"

        # The kernel is this environment, and `import helpers` works in it
        text = page.locator(".jp-Notebook").inner_text()
        m = re.search(r"KERNEL-PREFIX (\S+)", text)
        assert m, f"{name}: the kernel check printed nothing (kernel {kernel!r})"
        assert Path(m.group(1)).resolve() == Path(sys.prefix).resolve(), \
            f"{name}: kernel {kernel!r} runs in {m.group(1)}, not in the workbook's environment {sys.prefix}"
        assert re.search(r"HELPERS-FILE \S*helpers", text), f"{name}: `import helpers` did not report its file"

        # The explorer: labelled sliders that show their value, and a figure under them
        box = page.locator(".widget-vbox").filter(has=page.locator(".widget-output")).last
        box.scroll_into_view_if_needed()
        sliders = box.locator(".widget-slider")
        assert sliders.count() == spec.sliders, f"{name}: {sliders.count()} sliders, expected {spec.sliders}"
        output = box.locator(".widget-output")
        page.wait_for_function("el => el.querySelector('img')", arg=output.element_handle(), timeout=30_000)
        for k in range(spec.sliders):
            slider = sliders.nth(k)
            label = slider.locator(".widget-label").first.inner_text().strip()
            readout = slider.locator(".widget-readout")
            assert label, f"{name}: slider {k} has no label"
            before_value = readout.inner_text().strip()
            assert before_value, f"{name}: slider '{label}' shows no value"
            before_src = _figure_src(output)
            before_png = box.screenshot(path=str(OUT / f"{stem}_slider{k}_before.png"))

            handle = slider.locator(".noUi-handle").first
            handle.focus()
            moved = time.monotonic()
            page.keyboard.press("ArrowLeft" if k == 0 else "ArrowRight")
            try:
                page.wait_for_function(
                    """([el, old]) => { const img = el.querySelector('img');
                                        return img && img.getAttribute('src') !== old; }""",
                    arg=[output.element_handle(), before_src], timeout=15_000, polling=50)
            except Exception:
                box.screenshot(path=str(OUT / f"{stem}_slider{k}_after.png"))
                raise AssertionError(f"{name}: moving '{label}' ({before_value} -> "
                                     f"{readout.inner_text().strip()}) did not change the figure within 15 s; "
                                     f"screenshots in {OUT}; the explorer's output shows:\n"
                                     f"{output.inner_text()[-1500:]}") from None
            latency = time.monotonic() - moved
            page.wait_for_timeout(300)
            after_png = box.screenshot(path=str(OUT / f"{stem}_slider{k}_after.png"))
            after_value = readout.inner_text().strip()
            print(f"{name}: '{label}' {before_value} -> {after_value}: figure redrawn in {latency:.2f} s")
            assert after_value != before_value, f"{name}: slider '{label}' still shows {before_value} after the move"
            assert after_png != before_png, f"{name}: moving '{label}' left the explorer's pixels unchanged"
            assert latency < RESPONSE_LIMIT_S, f"{name}: '{label}' took {latency:.1f} s to redraw"
        print(f"{name}: opened and ran in {t_run:.0f} s, whole check {time.monotonic() - t0:.0f} s")
    finally:
        page.screenshot(path=str(OUT / f"{stem}_page.png"), full_page=False)
        context.close()
