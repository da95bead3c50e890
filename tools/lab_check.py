"""`make lab-check`: every notebook opened in JupyterLab in a real browser, run top to bottom, saved,
and checked (no error output, nothing on stderr, its figures shown).

It starts JupyterLab on a loopback port (a random token) over a scratch folder that holds copies of
notebooks/ and a link to results/, so the notebooks read results/default (or fall back to
results/cpu-study-paper) exactly as from the repository, and the committed .ipynb files stay stripped.
Chromium (the system's, Debian package `chromium`) is driven through Playwright
(`executable_path`; never `playwright install`). The server it started is stopped at the end.

    python tools/lab_check.py [--notebooks tables heatmaps ...] [--timeout 900] [--keep DIR]
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dsmoe.report.nbcheck import first_output, problems  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOKS = ("tables", "heatmaps", "tau_curves", "explorer")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root, port, token, log):
    """JupyterLab serving `root` on 127.0.0.1:`port`; waits until it answers (or raises)."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI run as root
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            time.sleep(1)
    stop(server)
    raise RuntimeError(f"JupyterLab did not answer on port {port} within 120 s; see {log.name}")


def stop(server):
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the current tab


def _kernels_idle(base, token):
    """Every kernel of the server idle (the Jupyter REST API)."""
    with urllib.request.urlopen(f"{base}/api/kernels?token={token}", timeout=10) as answer:
        kernels = json.load(answer)
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def _all_ran(path):
    """Every code cell of the saved notebook has an execution count, or one stopped the run with an error."""
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    stopped = any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    return stopped or all(c.get("execution_count") for c in cells)


def run_in_browser(page, base, token, name, saved, timeout_s):
    """Open a notebook (a fresh workspace), run all cells (Run menu), wait until the kernel is idle and
    the saved notebook (Ctrl+S) shows every cell run. JupyterLab renders only the cells in view, so
    completion is read from the kernel's state and the saved file, not from the page."""
    page.goto(f"{base}/lab/tree/notebooks/{name}.ipynb?reset&token={token}")
    page.locator(f"{PANEL} .jp-CodeCell .jp-InputArea-prompt").first.wait_for(timeout=120_000)
    page.wait_for_timeout(3000)  # the kernel starts
    page.locator(f"{PANEL} .jp-Cell").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.time() + timeout_s
    while True:
        time.sleep(3)
        if _kernels_idle(base, token):
            page.keyboard.press("Control+s")
            page.wait_for_timeout(3000)
            if _all_ran(saved):
                return
        if time.time() > deadline:
            raise TimeoutError(f"cells still running after {timeout_s} s")


def check(names, timeout_s, keep=None):
    from playwright.sync_api import sync_playwright

    scratch = Path(keep or tempfile.mkdtemp(prefix="dsmoe-lab-check-"))
    shutil.rmtree(scratch / "notebooks", ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "notebooks").mkdir()
    for name in names:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", scratch / "notebooks")
    if not (scratch / "results").exists():
        (scratch / "results").symlink_to(ROOT / "results")
    port, token = free_port(), secrets.token_hex(16)
    failures = {}
    with open(scratch / "jupyterlab.log", "w") as log:
        server = start_lab(scratch, port, token, log)
        print(f"JupyterLab on 127.0.0.1:{port} (pid {server.pid}), serving {scratch}")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                for name in names:
                    start = time.time()
                    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    saved = scratch / "notebooks" / f"{name}.ipynb"
                    try:
                        run_in_browser(page, f"http://127.0.0.1:{port}", token, name, saved, timeout_s)
                        found = problems(saved, name)
                    except Exception as err:  # a notebook that cannot be driven fails the check, the others still run
                        found = [f"{type(err).__name__}: {err}"]
                        page.screenshot(path=str(scratch / f"{name}-failure.png"))
                    print(f"{name}: {'ok' if not found else 'FAILED'} ({time.time() - start:.0f} s); first output: "
                          f"{first_output(saved).strip()[:160]!r}")
                    page.context.close()
                    for line in found:
                        print(f"  {line.splitlines()[0]}")
                    if found:
                        failures[name] = found
                browser.close()
        finally:
            stop(server)
            print(f"JupyterLab stopped (pid {server.pid}, exit {server.returncode})")
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="+", default=list(NOTEBOOKS), choices=NOTEBOOKS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds each notebook may run (default %(default)s)")
    parser.add_argument("--keep", help="scratch folder to keep (the saved notebooks, the server log)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{CHROMIUM} not found: install the Debian package (apt-get install chromium); `make lab-check` does")
    failures = check(args.notebooks, args.timeout, args.keep)
    print(f"lab-check: {len(args.notebooks) - len(failures)} of {len(args.notebooks)} notebooks clean")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
