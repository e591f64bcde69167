"""Execute the workbook's notebooks with papermill: `python -m helpers.runner [--nb 00] [--fast 0]`.

Executed copies go to runs/ (or back into notebooks/ with --inplace), figures to figures/, each
notebook's key numbers to runs/<name>.results.json; the run ends with one table of every result.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from helpers.env import NOTEBOOKS, RUNS


def find_notebooks(selection: list[str] | None) -> list[Path]:
    """Notebooks in notebooks/ whose name starts with one of `selection` (all when None)."""
    books = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return books
    chosen = [p for p in books if any(p.name.startswith(s) or p.stem == s for s in selection)]
    if not chosen:
        names = ", ".join(p.stem for p in books)
        raise SystemExit(f"no notebook matches {selection}; there are: {names}")
    return chosen


def run_one(path: Path, out: Path, parameters: dict, progress: bool) -> tuple[str, float, str]:
    import papermill as pm

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or None, cwd=str(path.parent),
                            kernel_name="python3", progress_bar=progress, log_output=False,
                            request_save_on_cell_execute=False)
        status = "ok"
        detail = ""
    except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
        status = "FAILED"
        detail = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    return status, time.perf_counter() - t0, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb", nargs="*", help="notebook number(s) or name(s), e.g. 00 03")
    parser.add_argument("--fast", type=int, choices=(0, 1), default=1, help="0: full-scale parameters (FAST=False)")
    parser.add_argument("--model", help="run with this MODEL parameter")
    parser.add_argument("--inplace", action="store_true", help="write outputs back into notebooks/ (for commits)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    from helpers import results

    books = find_notebooks(args.nb)
    parameters: dict = {}
    if args.fast == 0:
        parameters["FAST"] = False
    if args.model:
        parameters["MODEL"] = args.model
    RUNS.mkdir(exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    summary = []
    outer = tqdm(books, desc="notebooks", unit="nb", disable=args.no_progress)
    for path in outer:
        outer.set_postfix_str(path.stem)
        out = path if args.inplace else RUNS / (path.stem + ("" if args.fast else "_full") + ".ipynb")
        status, seconds, detail = run_one(path, out, parameters, progress=not args.no_progress)
        line = f"{path.stem:<32} {status:<7} {seconds:7.1f} s  -> {out.relative_to(out.parents[1])}"
        tqdm.write(line + (f"\n    {detail}" if detail else ""))
        summary.append((path.stem, status, seconds))
    failed = [name for name, status, _ in summary if status != "ok"]
    total = sum(s for _, _, s in summary)
    print(f"\n{len(summary) - len(failed)}/{len(summary)} notebooks ran in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    table = results.combined_table()
    if len(table):
        import pandas as pd

        ran = {name for name, _, _ in summary}
        table = table[table.notebook.isin(ran)]
        with pd.option_context("display.max_colwidth", 50, "display.width", 220, "display.max_rows", 500):
            print("\nKey results (runs/*.results.json):")
            print(table.to_string(index=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
