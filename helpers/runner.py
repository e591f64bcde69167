"""Execute the workbook's notebooks with papermill: `python -m helpers.runner [--nb 00] [--fast 0] [--jobs 2]`.

`make run`: executed copies, figures (runs/figures) and each notebook's records (runs/<name>.results.json) all
go to runs/, so the checkout stays clean; the run ends with one table per kind across notebooks and any
difference from the committed baselines (tests/baselines/).
`make notebooks` (--inplace): re-executes the committed notebooks in place, writes figures/ and the baselines,
and scrubs local paths from papermill's metadata. That is the command for commits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers.paths import FIGURES, NOTEBOOKS, RUNS

# Kernels draw with Agg: `plotting.savefig` shows each figure inline itself (as the saved PNG), and the inline
# backend makes papermill hang on ipywidgets explorers that call plt.show() inside an Output widget.
KERNEL_BACKEND = "Agg"
LOCAL_METADATA = ("input_path", "output_path", "environment_variables")


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


def scrub_metadata(path: Path) -> None:
    """Drop what papermill stores about the machine that ran a notebook (its input/output paths)."""
    nb = json.loads(path.read_text())
    pm = nb.get("metadata", {}).get("papermill", {})
    changed = [pm.pop(key) for key in LOCAL_METADATA if key in pm]
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run_one(path: Path, out: Path, parameters: dict, progress: bool) -> tuple[str, float, str]:
    import papermill as pm

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or None, cwd=str(path.parent),
                            kernel_name="python3", progress_bar=progress, log_output=False,
                            request_save_on_cell_execute=False)
        status, detail = "ok", ""
    except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
        status = "FAILED"
        detail = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
    if out.exists():
        scrub_metadata(out)
    return status, time.perf_counter() - t0, detail


def kernel_environment(inplace: bool, jobs: int, write_baseline: bool) -> None:
    """Set what the notebook kernels inherit: the matplotlib backend, where figures go, threads per kernel, baselines."""
    os.environ["MPLBACKEND"] = KERNEL_BACKEND
    os.environ["WORKBOOK_FIGURES"] = str(FIGURES if inplace else RUNS / "figures")
    if jobs > 1 and not os.environ.get("WORKBOOK_THREADS"):
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            cores = os.cpu_count() or 1
        os.environ["WORKBOOK_THREADS"] = str(max(1, cores // jobs))
    if write_baseline:
        os.environ["WORKBOOK_WRITE_BASELINE"] = "1"
    os.environ.pop("WORKBOOK_CHECK_BASELINE", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb", nargs="*", help="notebook number(s) or name(s), e.g. 00 03")
    parser.add_argument("--fast", type=int, choices=(0, 1), default=1, help="0: full-scale parameters (FAST=False)")
    parser.add_argument("--model", help="run with this MODEL parameter")
    parser.add_argument("--seed", type=int, help="run with this SEED parameter (outputs runs/<notebook>_seed<S>.ipynb)")
    parser.add_argument("--inplace", action="store_true",
                        help="write outputs back into notebooks/, figures into figures/, and the regression baselines")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks executed at once (torch threads are shared out)")
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
    if args.seed is not None:
        parameters["SEED"] = args.seed
    if args.inplace and parameters:   # committed notebooks, figures and baselines are the default run's
        raise SystemExit(f"--inplace writes the committed notebooks: run {sorted(parameters)} without it (into runs/)")
    RUNS.mkdir(exist_ok=True)
    kernel_environment(args.inplace, args.jobs, write_baseline=args.inplace)   # --inplace has no parameters (above)
    progress = not args.no_progress and args.jobs == 1

    def one(path: Path) -> tuple[str, str, float, str]:
        suffix = ("" if args.fast else "_full") + ("" if args.seed is None else f"_seed{args.seed}")
        out = path if args.inplace else RUNS / (path.stem + suffix + ".ipynb")
        status, seconds, detail = run_one(path, out, parameters, progress=progress)
        tqdm.write(f"{path.stem:<36} {status:<7} {seconds:7.1f} s  -> {out.relative_to(out.parents[1])}"
                   + (f"\n    {detail}" if detail else ""))
        return path.stem, status, seconds, detail

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        summary = list(tqdm(pool.map(one, books), total=len(books), desc="notebooks", unit="nb",
                            disable=args.no_progress))
    failed = [name for name, status, _, _ in summary if status != "ok"]
    total = sum(s for _, _, s, _ in summary)
    print(f"\n{len(summary) - len(failed)}/{len(summary)} notebooks ran ({total:.0f} s of notebook time)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    ran = [name for name, status, _, _ in summary if status == "ok"]
    if ran:
        print("\nKey results (runs/*.results.json); only claims count as reproduced:")
        results.combined_report(ran)
        if not args.inplace:
            for run in (r for r in results.load_all() if r["notebook"] in ran):
                problems = results.check_against_baseline(run)
                if problems:
                    print(f"\n{run['notebook']} differs from tests/baselines/{run['notebook']}.json:\n" + "\n".join(problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
