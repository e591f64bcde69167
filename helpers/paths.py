"""Where things live: the leaf module every other helper may import (it imports nothing of the package).

    from helpers.paths import DATA, figures_folder
    words = json.loads((DATA / "word_pairs.json").read_text())

`FIGURES` is the committed figures/ folder; `figures_folder()` is where a run saves its figures: runs/figures
unless $WORKBOOK_FIGURES says otherwise (`make notebooks` points it at figures/), so running a notebook
never dirties the checkout.
"""
from __future__ import annotations

import os
from pathlib import Path


def _find_root() -> Path:
    """The repository root: $WORKBOOK_ROOT, else the folder above this package, else the working directory."""
    if os.environ.get("WORKBOOK_ROOT"):
        return Path(os.environ["WORKBOOK_ROOT"]).expanduser().resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "notebooks").is_dir():
        return here
    return Path.cwd()


ROOT: Path = _find_root()
DATA: Path = ROOT / "data"
FIGURES: Path = ROOT / "figures"
RUNS: Path = ROOT / "runs"
NOTEBOOKS: Path = ROOT / "notebooks"
BASELINES: Path = ROOT / "tests" / "baselines"


def figures_folder() -> Path:
    """Where `plotting.savefig` writes: $WORKBOOK_FIGURES, else runs/figures (git-ignored)."""
    return Path(os.environ["WORKBOOK_FIGURES"]) if os.environ.get("WORKBOOK_FIGURES") else RUNS / "figures"
