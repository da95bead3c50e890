"""What an executed notebook must not hold: error outputs, anything written to stderr (warnings
included), or fewer figures than it draws. `make lab-check` (tools/lab_check.py) and the notebook
tests read a saved notebook with these."""

import json
from pathlib import Path

FIGURE_TYPES = ("image/png", "image/svg+xml")
# Figures each notebook draws on any run that has its data (the explorer one, heatmaps one per model).
MIN_FIGURES = {"tables": 1, "heatmaps": 3, "tau_curves": 1, "explorer": 1}


def outputs(notebook):
    """(cell index, output) of every code cell's outputs; `notebook`: a path or a loaded dict."""
    if not isinstance(notebook, dict):
        notebook = json.loads(Path(notebook).read_text())
    return [(i, out) for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
            for out in cell.get("outputs", [])]


def _text(out):
    text = out.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def problems(notebook, name=None):
    """Lines describing each error output, each stderr output and a figure count below `MIN_FIGURES[name]`;
    empty for a clean notebook."""
    found, figures = [], 0
    for i, out in outputs(notebook):
        kind = out.get("output_type")
        if kind == "error":
            found.append(f"cell {i}: error {out.get('ename')}: {out.get('evalue')}")
        elif kind == "stream" and out.get("name") == "stderr":
            found.append(f"cell {i}: stderr: {_text(out).strip()[:300]}")
        elif kind in ("display_data", "execute_result") and any(t in out.get("data", {}) for t in FIGURE_TYPES):
            figures += 1
    need = MIN_FIGURES.get(name, 0)
    if figures < need:
        found.append(f"{figures} figure(s) shown, at least {need} expected")
    return found


def first_output(notebook):
    """The text of the notebook's first output (where a notebook says which run it reads)."""
    found = outputs(notebook)
    return _text(found[0][1]) if found else ""
