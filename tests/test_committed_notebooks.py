"""What a reader sees on the web: every committed notebook shows its figures inline, carries no local path,
reports its measured cost, has a regression baseline of its records (tests/baselines/), and keeps code cells
short enough to copy (at most 40 lines)."""
import json
import re
import socket

import pytest

from helpers.paths import BASELINES, NOTEBOOKS

BOOKS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
LOCAL = re.compile(r"(/root/|/home/|/Users/|/work/|/tmp/|/private/var/|/content/|[A-Za-z]:\\\\Users)")


def load(path):
    return json.loads(path.read_text())


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def text_of(output) -> str:
    if "text" in output:
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join(data.get("text/plain", "")) + "".join(data.get("text/html", ""))


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_every_saved_figure_is_shown_inline(path):
    missing = []
    for i, cell in enumerate(code_cells(load(path))):
        src = "".join(cell["source"])
        if "savefig(" in src and not src.lstrip().startswith("# NBVAL_SKIP"):
            if not any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
                missing.append(f"code cell {i}: {src.splitlines()[0][:60]}")
    assert not missing, f"{path.name}: cells that save a figure but show none:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_no_local_paths_or_host_names(path):
    nb = load(path)
    papermill = nb.get("metadata", {}).get("papermill", {})
    assert not {"input_path", "output_path"} & papermill.keys(), f"{path.name}: papermill metadata keeps local paths"
    host = socket.gethostname()
    found = [f"cell {i} source: {bad!r}" for i, cell in enumerate(nb["cells"])
             for bad in LOCAL.findall("".join(cell["source"]))]
    for i, cell in enumerate(code_cells(nb)):
        for out in cell.get("outputs", []):
            text = text_of(out) + "".join(out.get("traceback", []))
            for bad in LOCAL.findall(text) + ([host] if host and len(host) > 3 and host in text else []):
                found.append(f"code cell {i}: {bad!r}")
    assert not found, f"{path.name}: local paths or host names in sources or outputs:\n" + "\n".join(found[:10])


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_results_report_measured_cost_and_kinds(path):
    nb = load(path)
    outputs = "".join(text_of(o) for c in code_cells(nb) if "results.report(" in "".join(c["source"])
                      for o in c.get("outputs", []))
    assert "wall time since setup()" in outputs and "peak memory" in outputs, f"{path.name}: no measured cost"
    assert "claims:" in outputs, f"{path.name}: the results report does not separate claims"
    title = "".join(nb["cells"][0]["source"])
    assert not re.search(r"[Rr]uns in (about )?\d|\d+\s*(–|-)\s*\d+\s*min", title), f"{path.name}: typed run time in the title"


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_a_baseline(path):
    base = BASELINES / f"{path.stem}.json"
    assert base.exists(), f"no regression baseline for {path.name}: run `make notebooks NB={path.stem[:2]}`"
    records = json.loads(base.read_text())["records"]
    assert records and all(r["kind"] in ("claim", "control", "check", "measurement") for r in records.values())


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_code_cells_are_short_enough_to_copy(path):
    long = [(i, n) for i, c in enumerate(load(path)["cells"]) if c["cell_type"] == "code"
            for n in [len("".join(c["source"]).splitlines())] if n > 40]
    assert not long, f"code cells over 40 lines (cell index, lines): {long}; split them at a natural step"
