"""JupyterLab in a real browser for tests/test_browser.py: a server on a loopback port and a page that drives it.

Playwright for Python drives a chromium already on the machine (Debian's `chromium` package, or one fetched with
`python -m playwright install chromium`); nothing is downloaded here. The server runs with its own Jupyter config,
data, runtime, settings and workspace folders, so neither the user's settings nor their JupyterLab state leak in
or out. The page reads results from the notebook model (`window.jupyterapp`, exposed by --expose-app-in-browser)
and from the rendered DOM: what the student would see.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOW_TO_GET = "install chromium: `apt-get install chromium` (Debian/Ubuntu) or `python -m playwright install chromium`"
REQUIRE_ENV = ("GPT2LAB_REQUIRE_BROWSER", "GPT2LAB_REQUIRE_DATA", "CI")  # any set: a missing browser fails the run
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Settings the server starts with: every cell stays in the DOM (no windowing, so the DOM assertions and the full-page
# screenshot see the whole notebook), and no news or update check (the test machine is offline).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def browser_required() -> bool:
    return any(os.environ.get(name) for name in REQUIRE_ENV)


def find_chromium() -> str | None:
    """Path of the system chromium, else of one fetched by `playwright install`, else None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # playwright missing or its driver broken: no browser of its own either
        return None
    return path if path and Path(path).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """`python -m jupyter lab` serving `root` on a free loopback port with a random token; a context manager.

    `env` is added to the environment the server (and so every kernel it starts) gets; a value None removes a key.
    """

    def __init__(self, root: Path, state: Path, env: dict[str, str | None], log: Path):
        self.root, self.state, self.log_path = root, state, log
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        for name, folder in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                             ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                             ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
            self.env[name] = str(state / folder)
            (state / folder).mkdir(parents=True, exist_ok=True)
        for name, value in LAB_SETTINGS.items():
            path = state / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value), encoding="utf-8")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> JupyterLab:
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--port-retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               "--expose-app-in-browser", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # should the test process die without stopping it: idle kernels culled, then the server exits
               "--MappingKernelManager.cull_idle_timeout=600", "--MappingKernelManager.cull_interval=60",
               "--ServerApp.shutdown_no_activity_timeout=600"]
        if os.getuid() == 0:
            cmd.append("--allow-root")  # CI runs as root; Jupyter refuses to unless told
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: the kernels go with it
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"jupyter lab did not answer on {self.url} within 90 s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # twice: jupyter asks "shut down?" on the first
            time.sleep(0.2)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started: the server and its kernels
                self.proc.wait(5)
        self.log.close()

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ in the page

CURRENT = "(window.jupyterapp && window.jupyterapp.shell.currentWidget)"

KERNEL_IDLE = f"""(path) => {{
    const w = {CURRENT};
    if (!w || !w.context || w.context.path !== path || !w.context.isReady) return false;
    const s = w.sessionContext && w.sessionContext.session;
    return !!(s && s.kernel && s.kernel.status === 'idle');
}}"""

# Run a command and keep its promise's result on window, so Python can wait for it with a timeout.
START_COMMAND = """([id, args]) => {
    window.__gpt2lab_done = undefined;
    window.jupyterapp.commands.execute(id, args || {}).then(
        (value) => { window.__gpt2lab_done = {ok: true, value: value === undefined ? null : value}; },
        (err) => { window.__gpt2lab_done = {ok: false, value: String(err)}; });
}"""

# One record per cell: the model (what gets saved) and the DOM (what is shown).
REPORT = f"""() => {{
    const w = {CURRENT};
    const WIDGET = 'application/vnd.jupyter.widget-view+json';
    const out = [];
    w.content.widgets.forEach((cell, i) => {{
        const m = cell.model.toJSON();
        const rec = {{index: i, type: m.cell_type, source: cell.model.sharedModel.getSource(), outputs: [],
                     shown: '', images: 0, widget_views: 0, live_widgets: 0, closed_widgets: 0, controls: 0,
                     progress: 0}};
        if (m.cell_type === 'code') {{
            rec.execution_count = m.execution_count;
            rec.outputs = m.outputs.map((o) => ({{
                type: o.output_type, name: o.name || null, ename: o.ename || null, evalue: o.evalue || null,
                text: String(o.text || (o.data && o.data['text/plain']) || ''),
                mimes: Object.keys(o.data || {{}}),
            }}));
            const area = cell.outputArea.node;
            const shownOutputs = [...area.querySelectorAll(':scope > .jp-OutputArea-child > .jp-OutputArea-output')];
            rec.shown = shownOutputs.map((e) => e.innerText).join('\\n');  // the outputs, not their [n]: prompts
            rec.images = area.querySelectorAll('.jp-OutputArea-output img').length;
            // one child per output, in the model's order: a widget output shows a live widget view (or an error)
            const views = m.outputs.map((o, k) => [o, shownOutputs[k]]).filter(([o]) => o.data && o.data[WIDGET]);
            rec.widget_views = views.filter(([, node]) => node).length;
            // live: a widget view is attached; closed: nothing is (a finished tqdm bar with leave=False goes away)
            rec.live_widgets = views.filter(([, node]) => node && node.querySelector(':scope > .jupyter-widgets'))
                .length;
            rec.closed_widgets = views.filter(([, node]) => node && !node.hasChildNodes()).length;
            rec.controls = area.querySelectorAll(
                '.jupyter-widgets input, .jupyter-widgets textarea, .jupyter-widgets select, .widget-slider').length;
            rec.progress = area.querySelectorAll('.widget-hprogress, .widget-progress').length;
        }}
        out.push(rec);
    }});
    return out;
}}"""


# Counts what appears in the page while cells run: progress bars (tqdm's, even those gone when done) and widget errors.
WATCH = """() => {
    const seen = window.__gpt2lab_seen = {progress: 0, widget_errors: 0};
    if (window.__gpt2lab_observer) window.__gpt2lab_observer.disconnect();
    window.__gpt2lab_observer = new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) {
            if (n.nodeType !== Node.ELEMENT_NODE) continue;
            seen.progress += n.matches('.widget-hprogress') + n.querySelectorAll('.widget-hprogress').length;
            seen.widget_errors += (n.textContent || '').includes('Error displaying widget');
        }
    });
    window.__gpt2lab_observer.observe(document.body, {childList: true, subtree: true});
}"""


SCROLL_TOP = f"() => {{ {CURRENT}.node.querySelector('.jp-WindowedPanel-outer').scrollTop = 0; }}"
LAST_CELL_BOTTOM = (
    f"() => {{ const cells = {CURRENT}.content.widgets; "
    "return Math.ceil(cells[cells.length - 1].node.getBoundingClientRect().bottom); }"
)


class LabPage:
    """One browser tab on a JupyterLab server: open a notebook, run it, read it, type into it, save it."""

    def __init__(self, page, lab: JupyterLab):
        self.page, self.lab = page, lab

    def open(self, path: str, timeout_s: float = 120) -> None:
        """Open `path` (relative to the server root) in a fresh workspace and wait for its kernel to be idle."""
        self.page.goto(f"{self.lab.url}/lab/tree/{path}?reset&token={self.lab.token}")
        self.page.wait_for_function(KERNEL_IDLE, arg=path, timeout=timeout_s * 1000, polling=250)

    def command(self, command_id: str, timeout_s: float, args: dict | None = None):
        """Execute a JupyterLab command and wait for its promise (run-all resolves once every cell has finished)."""
        self.page.evaluate(START_COMMAND, [command_id, args])
        self.page.wait_for_function("() => window.__gpt2lab_done !== undefined", timeout=timeout_s * 1000,
                                    polling=500)
        done = self.page.evaluate("() => window.__gpt2lab_done")
        if not done["ok"]:
            raise RuntimeError(f"{command_id} failed in the browser: {done['value']}")
        return done["value"]

    def run_all(self, path: str, timeout_s: float) -> float:
        """Run every cell through the UI; return the seconds it took."""
        self.page.evaluate(WATCH)
        start = time.perf_counter()
        self.command("notebook:run-all-cells", timeout_s)
        self.page.wait_for_function(KERNEL_IDLE, arg=path, timeout=60_000, polling=250)
        self.page.wait_for_timeout(1500)  # widget views render after their model arrives
        return time.perf_counter() - start

    def seen(self) -> dict:
        """What appeared while the last run_all ran: {"progress": bars, "widget_errors": widgets that failed}."""
        return self.page.evaluate("() => window.__gpt2lab_seen")

    def cells(self) -> list[dict]:
        return self.page.evaluate(REPORT)

    def run_cell(self, index: int, timeout_s: float = 60) -> None:
        """Select cell `index` and run it (notebook:run-cell, what Ctrl+Enter does)."""
        self.page.evaluate(f"(i) => {{ {CURRENT}.content.activeCellIndex = i; }}", index)
        self.command("notebook:run-cell", timeout_s)

    def type_into(self, index: int, text: str) -> str:
        """Click into cell `index`'s editor, select all, type `text` with the keyboard; return the cell's source.

        After each Enter the editor indents as it guesses; that indentation is selected (Shift+Home) and the line
        is typed with its own, so the cell holds exactly `text`.
        """
        self.page.evaluate(f"(i) => {{ const w = {CURRENT}; w.content.activeCellIndex = i; }}", index)
        editor = self.page.locator(".jp-Notebook .jp-Cell.jp-mod-active .cm-content")
        editor.click()
        self.page.keyboard.press("ControlOrMeta+a")
        lines = text.split("\n")
        for n, line in enumerate(lines):
            if n:
                self.page.keyboard.press("Enter")
                self.page.keyboard.press("Shift+Home")  # the auto-indentation, replaced by the line's own
            self.page.keyboard.type(line)
        return self.page.evaluate(f"(i) => {CURRENT}.content.widgets[i].model.sharedModel.getSource()", index)

    def save(self, timeout_s: float = 30) -> None:
        """Save with Ctrl+S, as a student does, and wait until the file on disk is the notebook shown."""
        self.page.keyboard.press("Escape")  # command mode: Ctrl+S saves the notebook either way
        self.page.keyboard.press("ControlOrMeta+s")
        self.page.wait_for_function(f"() => {{ const w = {CURRENT}; return !w.context.model.dirty; }}",
                                    timeout=timeout_s * 1000, polling=250)

    def close(self, timeout_s: float = 60) -> None:
        """Save (closing an unsaved notebook asks), shut the kernel down and close every tab."""
        self.command("docmanager:save", timeout_s)
        self.page.evaluate(f"() => {CURRENT}.sessionContext.shutdown()")
        self.command("application:close-all", timeout_s)

    def screenshot(self, path: Path) -> None:
        """The whole notebook in one picture: the viewport is stretched to the notebook's height, then restored."""
        size = self.page.viewport_size
        self.page.evaluate(SCROLL_TOP)
        bottom = self.page.evaluate(LAST_CELL_BOTTOM)  # the notebook scrolls inside the page, past its end too
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.set_viewport_size({"width": size["width"], "height": min(max(bottom + 60, size["height"]), 16000)})
        self.page.evaluate(SCROLL_TOP)
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path), full_page=True)
        self.page.set_viewport_size(size)
