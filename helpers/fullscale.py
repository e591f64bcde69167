"""Full-scale runs (FAST=False): run them, smoke-test every full-scale path, and say what changes with scale.

    python -m helpers.fullscale run --nb 00 11 --timeout 1200      # FAST=False on this machine (CUDA if present)
    python -m helpers.fullscale smoke                              # every notebook's FAST=False path, tiny model
    python -m helpers.fullscale table                              # results/full/README.md: default vs full scale

`run` fans the notebooks out with `helpers.sweep` (FAST=0, one seed, the default model unless --models), then
`collect` copies each finished grid point's results JSON to results/full/<machine>/<notebook>.results.json with
its provenance (device and GPU name, torch version, threads, wall time, peak memory, commit) and writes
results/full/<machine>/runs.json with every task's status (finished, failed with its error, timed out).

`smoke` runs every notebook with FAST=False on a small random-weights model of the default architecture
(`models.save_tiny_model`: 8 layers, d_model 256), so that a full-scale path that cannot get past a cell
(a shape, an index, a device) fails here, in minutes, and not hours into a GPU run. It checks code, not
results: a model that knows nothing gives meaningless numbers, and it is not the model the sizes were set for.
Notebooks 03, 08, 09, 10 and 11 need a model that knows something (a random model knows nothing and they say so), so their
smoke runs use the default model at a reduced size (`SMOKE_ON_DEFAULT_MODEL`); 09 and 12 take `SIZES`, which shrinks
their full-scale sizes but keeps the full-scale path (`helpers.override_sizes`; 06 too, to reach its last cells).

`table` compares every claim at the default scale (tests/baselines/) with each full-scale run under results/full/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import results
from helpers.paths import BASELINES, ROOT, RUNS

RESULTS_FULL = ROOT / "results" / "full"
FULL_RUNS = RUNS / "full"
SMOKE_RUNS = RUNS / "smoke"
# Smoke runs only: a layer inside the tiny model's 8 (notebook 12's default is SmolLM2's 26), and fewer training
# steps for the toys of 01 and 05, which ignore MODEL and would train at full size (hours on a CPU).
SMOKE_PARAMS = {"PROBE_LAYER": 6, "TRAIN_STEPS": 200, "TOY_STEPS": 10}
# Notebooks whose full-scale path needs a model that knows something: on a random model they stop, by design, with a
# clear error at their first competence gate (03: "need at least one training and one test subject", the subjects
# the model gets right; 08: a steering curve that never rises; 09: no known fact to trace; 10: no right answer to
# calibrate; 11: no head of a kind to compare with). Their smoke run uses the default model, at a reduced size through
# their parameters (10 and 11 at their full size: 11 and 8 minutes here; 09 through SIZES, which keeps the full
# path: every layer and position, several noise samples, every relation).
SMOKE_ON_DEFAULT_MODEL = {"03": {"LRE_RELATIONS": ["country → capital"], "CAUSALITY_RELATIONS": ["country → capital"],
                                 "N_RANDOM_PAIRS": 2000},
                          "08": {"CONCEPTS": ["ocean"]},
                          "09": {"SIZES": {"N_FACTS": 4, "N_NOISE": 2, "N_CMP": 3, "N_EDIT": 3, "N_RANDOM": 2,
                                           "N_NAIVE": 8, "N_ATTR": 6, "N_PERM": 500}},
                          "10": {}, "11": {}}
# Tiny-model notebooks whose full sizes alone take hours here (06: 50 prompts per task, 300 learned-prompt steps per
# layer, 400 KL steps; 12: 128 rows x 256 tokens through a 49k vocabulary, for every norm): the same full-scale path
# (06: every task and layer, generated texts, the KL-trained lens; 12: every norm, one layer per GAP steps), smaller.
SMOKE_SIZES = {"06": {"N_ICL": 12, "N_SHUFFLED": 8, "N_CORRUPT": 4, "N_EVAL": 20, "N_SHUFFLED_FV": 16, "N_NULL": 200,
                      "N_SEQ": 40, "N_GENERATE": 8, "N_TEST": 200, "SOFT_STEPS": 10, "TUNED_KL_STEPS": 20},
               "12": {"N_SWEEP": 4, "N_EVAL": 16, "N_CALIB": 16, "MAX_LEN": 64, "BATCH": 4, "STEPS_PER_STAGE": 2,
                      "GAP": 2, "N_BOOT": 200}}


def machine_label() -> str:
    """'cuda-NVIDIA-H200' or 'cpu-2cores': the folder the results of this machine go to."""
    import torch

    from helpers.sweep import _safe

    if torch.cuda.is_available():
        return "cuda-" + _safe(torch.cuda.get_device_name(0))
    return f"cpu-{os.cpu_count()}cores"


def provenance() -> dict[str, Any]:
    """What produced a full-scale run: machine, accelerator, library versions and the commit."""
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": machine_label(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": commit, "uncommitted_changes": dirty,
            "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}   # each run's end: runs.json "finished"


def collect(out: Path = FULL_RUNS, dest: Path | None = None) -> dict[str, Any]:
    """Copy the full-scale (FAST=False) results under `out` (a sweep's folder) to results/full/<machine>/, each
    with the provenance of the run and its task record; write runs.json with every task's status."""
    dest = Path(dest or RESULTS_FULL / machine_label())
    dest.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    runs = json.loads((dest / "runs.json").read_text()) if (dest / "runs.json").is_file() else {}
    runs.pop("_provenance", None)   # the machine's earlier runs stay; the provenance is this collection's
    for task_file in sorted(Path(out).glob("*/*/seed*_full/task.json")):
        task = json.loads(task_file.read_text())
        notebook = task_file.parents[2].name
        found = sorted(task_file.parent.glob("*.results.json"))
        entry = {k: task.get(k) for k in ("status", "error", "seconds", "threads", "finished")}
        entry["model"] = task_file.parents[1].name
        payload = json.loads(found[0].read_text()) if found and task.get("status") == "ok" else None
        if payload is not None and payload.get("context", {}).get("sizes"):   # a smoke run's SIZES: not the experiment
            entry["status"] = f"not collected: reduced sizes {payload['context']['sizes']}"
        elif payload is not None:
            kept = dest / found[0].name
            old = json.loads(kept.read_text()).get("provenance", {}) if kept.is_file() else {}
            if old.get("task_seconds") == task.get("seconds") and old.get("finished") in (None, task.get("finished")):
                payload["provenance"] = old   # the same run collected before: keep what produced it (commit, time)
            else:
                payload["provenance"] = {**prov, "task_seconds": task.get("seconds"), "threads": task.get("threads"),
                                         "finished": task.get("finished")}
            kept.write_text(json.dumps(payload, indent=1, default=str) + "\n")
            entry["cost"] = payload.get("cost")
            entry["summary"] = _counts(payload["records"])
        runs[notebook] = entry
    runs = dict(sorted(runs.items()))
    (dest / "runs.json").write_text(json.dumps({"_provenance": prov, **runs}, indent=1) + "\n")
    return runs


def _counts(records: list[dict]) -> dict[str, str]:
    """'claims: 3/7 reproduced, controls: 2/2 ...' as numbers per kind."""
    out = {}
    for kind in ("claim", "control", "check"):
        rs = [r for r in records if r["kind"] == kind]
        if rs:
            out[kind] = f"{sum(bool(r.get('passed')) for r in rs)}/{len(rs)}"
    return out


def _cell(text: str) -> str:
    """Text for a markdown table cell: '|' (as in |Δ log-odds|) would end the cell."""
    return str(text).replace("|", "\\|")


def compare(notebook: str, full: dict, baseline: dict) -> list[dict[str, Any]]:
    """Every claim of one notebook at the default scale (baseline) and at full scale, matched by key."""
    records = baseline["records"]   # tests/baselines/: {key: record}; a results JSON: [record with its key]
    records = [{"key": k, **r} for k, r in records.items()] if isinstance(records, dict) else records
    base = {r["key"]: r for r in records if r["kind"] == "claim"}
    shape = lambda key: re.sub(r"\d+(\.\d+)?", "#", key)   # "... at n = 160" and "... at n = 670": one claim
    rows, full_keys = [], {r["key"] for r in full["records"]}
    for r in full["records"]:
        if r["kind"] != "claim":
            continue
        b = base.pop(r["key"], None)
        twins = [k for k in base if k not in full_keys and shape(k) == shape(r["key"])]
        if b is None and len(twins) == 1:    # the same claim, with a size in its key
            b = base.pop(twins[0])
        rows.append({"notebook": notebook, "claim": r["key"], "default": results._fmt(b["value"]) if b else "—",
                     "default_verdict": b["verdict"] if b else "(not at default scale)",
                     "full": results._fmt(r["value"]), "full_verdict": r["verdict"],
                     "changes": bool(b) and b["verdict"] != r["verdict"]})
    for key, b in base.items():
        rows.append({"notebook": notebook, "claim": key, "default": results._fmt(b["value"]),
                     "default_verdict": b["verdict"],
                     "full": "—", "full_verdict": "(not at full scale)", "changes": False})
    return rows


def table(root: Path = RESULTS_FULL, baselines: Path = BASELINES) -> str:
    """results/full/README.md: for each machine's full-scale runs, every claim at default vs full scale."""
    parts = ["# Full-scale results (FAST=False)", "",
             "Written by `python -m helpers.fullscale table` from the results JSON in the folders below (one per "
             "machine: `cpu-<cores>cores` or `cuda-<gpu>`) and the default-scale records in `tests/baselines/`. "
             "A verdict that differs between the two scales is in **bold**. Provenance (machine, torch, commit, "
             "wall time, peak memory) is in each results JSON and in `runs.json`.", ""]
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        runs = json.loads((folder / "runs.json").read_text()) if (folder / "runs.json").is_file() else {}
        prov = runs.get("_provenance", {})
        parts += [f"## {folder.name}", "",
                  f"{prov.get('gpu') or prov.get('cpu', '?')}, {prov.get('cores', '?')} cores, torch "
                  f"{prov.get('torch', '?')}; last collection at commit {str(prov.get('commit', '?'))[:7]} (each results JSON names "
                  "the commit that produced it).", "",
                  "| notebook | status | wall time | torch threads | peak memory | claims | controls | checks |",
                  "|---|---|---|---|---|---|---|---|"]
        for nb, e in runs.items():
            if nb.startswith("_"):
                continue
            cost, s = e.get("cost") or {}, e.get("summary") or {}
            gpu = f", GPU {cost['peak_gpu_memory_gb']:.1f} GB" if cost.get("peak_gpu_memory_gb") is not None else ""
            status = e["status"] + (f": {e['error'][:90]}" if e.get("error") else "")
            wall = f"{cost['wall_s']:.0f} s" if cost else (f"{e['seconds']:.0f} s (task)" if e.get("seconds") else "—")
            parts.append(f"| {nb} | {_cell(status)} | {wall} | {e.get('threads', '?')} | "
                         f"{(str(cost['peak_memory_gb']) + ' GB' + gpu) if cost else '—'} | {s.get('claim', '—')} | "
                         f"{s.get('control', '—')} | {s.get('check', '—')} |")
        parts += ["", "| notebook | claim | default scale | full scale |", "|---|---|---|---|"]
        for path in sorted(folder.glob("*.results.json")):
            full = json.loads(path.read_text())
            base_path = Path(baselines) / f"{full['notebook']}.json"
            baseline = json.loads(base_path.read_text()) if base_path.is_file() else {"records": []}
            for row in compare(full["notebook"], full, baseline):
                cell = lambda v, verdict: f"**{v} ({verdict})**" if row["changes"] else f"{v} ({verdict})"
                parts.append(f"| {row['notebook'][:2]} | {_cell(row['claim'])} | {cell(row['default'], row['default_verdict'])} | "
                             f"{cell(row['full'], row['full_verdict'])} |")
        parts.append("")
    text = "\n".join(parts)
    (Path(root) / "README.md").write_text(text)
    return text


def tiny_model_folder() -> Path:
    """The smoke runs' small random llama, built once in the model cache."""
    from helpers import models

    folder = models.cache_dir() / "tiny-llama-smoke"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        models.save_tiny_model(tmp)
        tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    from helpers import sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "smoke", "collect", "table"))
    parser.add_argument("--nb", nargs="*", help="notebook numbers or names (default: all)")
    parser.add_argument("--models", nargs="*", help="run: MODEL values (default: the offline default)")
    parser.add_argument("--timeout", type=float, help="seconds before a notebook is killed and reported")
    parser.add_argument("--out", type=Path, help="the sweep's folder (default runs/full, runs/smoke)")
    parser.add_argument("--sweep-args", nargs=argparse.REMAINDER, default=[],
                        help="anything else for helpers.sweep (--workers, --threads, --gpus, --resume, -p NAME=VALUE)")
    args = parser.parse_args(argv)
    rc = 0
    if args.action in ("run", "smoke"):
        smoke = args.action == "smoke"
        out = Path(args.out or (SMOKE_RUNS if smoke else FULL_RUNS))
        base = ["--fast", "0", "--seeds", "0", "--out", str(out)] + (["--timeout", str(args.timeout)] if args.timeout else [])
        extra = list(args.sweep_args)
        if not smoke:
            rc = sweep.main(base + (["--nb", *args.nb] if args.nb else []) + (["--models", *args.models] if args.models else [])
                            + extra)
            collect(out)
        else:
            from helpers.runner import find_notebooks

            chosen = [p.name[:2] for p in find_notebooks(args.nb)]
            for nb in [nb for nb in chosen if nb in SMOKE_ON_DEFAULT_MODEL]:   # one sweep each: its own parameters
                params = [x for k, v in SMOKE_ON_DEFAULT_MODEL[nb].items() for x in ("-p", f"{k}={json.dumps(v)}")]
                rc |= sweep.main(base + ["--nb", nb] + params + extra)
            tiny = [nb for nb in chosen if nb not in SMOKE_ON_DEFAULT_MODEL]
            params = [x for k, v in SMOKE_PARAMS.items() for x in ("-p", f"{k}={json.dumps(v)}")]
            for group in [[nb for nb in tiny if nb not in SMOKE_SIZES]] + [[nb] for nb in tiny if nb in SMOKE_SIZES]:
                if group:
                    sizes = ["-p", f"SIZES={json.dumps(SMOKE_SIZES[group[0]])}"] if group[0] in SMOKE_SIZES else []
                    rc |= sweep.main(base + ["--nb", *group, "--models", str(tiny_model_folder())] + params + sizes + extra)
    if args.action == "collect":
        collect(Path(args.out or FULL_RUNS))
    if args.action in ("run", "table", "collect") and RESULTS_FULL.is_dir():
        print(table())
    return rc


if __name__ == "__main__":
    sys.exit(main())
