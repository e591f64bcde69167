"""Sweeps: notebooks x models x seeds (x FAST) fanned out on a Dask cluster, and which claims generalize.

    make sweep NB="00 11" MODELS="SmolLM2-135M-Instruct /path/model.gguf" SEEDS="0 1 2"
    python -m helpers.sweep --nb 00 11 --models SmolLM2-135M-Instruct --seeds 0 1 2 [--scheduler tcp://host:8786]

Each grid point is one Dask task. The task runs papermill in a child process of the worker, with the
workbook's environment variables pointing every output into the grid point's own folder
runs/sweep/<notebook>/<model>/seed<S>[_full]/ (executed notebook, <notebook>.results.json, figures/, log.txt,
task.json), so no two tasks write the same file and nothing tracked by git is touched.

Engine: a `distributed.LocalCluster` on 127.0.0.1 sized to the machine (workers x torch threads <= cores, and
about 5 GB of memory per worker), or any running scheduler with `--scheduler ADDRESS` (or
$DASK_SCHEDULER_ADDRESS, dask's own setting): a SLURM/PBS cluster from `dask-jobqueue`, Kubernetes, or
`dask scheduler` + `dask worker` by hand. `--gpus N` makes every task ask for the worker resource GPU=1.
This module writes no scheduler, pool or queue of its own.

Before the fan-out every model is resolved once in the client (`helpers.models.resolve`: a GGUF file is
dequantized into the cache there, so parallel first loads never race on it). A task that fails (or whose
worker dies) is reported with its error and the others go on; `--timeout S` kills a task's notebook process
tree after S seconds and reports it; `--resume` skips grid points whose results JSON already exists.

The answer to "which results generalize" is `summarize`: computed from the `kind="claim"` records of every
grid point's results JSON (value and verdict), it writes runs/sweep/summary.md (+ summary.json) and
runs/sweep/summary.png: for every claim, in how many seeds it holds for each model, with the spread of its
value, and whether it holds everywhere, depends on the seed, depends on the model, or holds nowhere.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from helpers.paths import RUNS

SWEEP = RUNS / "sweep"
MEMORY_PER_TASK_GB = 5.0   # the heaviest notebook peaks at 4.5 GB (06, README): one worker per 5 GB of RAM
STATUS_OK, STATUS_FAILED, STATUS_TIMEOUT, STATUS_SKIPPED = "ok", "failed", "timed out", "skipped (resumed)"
BASELINE_FLAGS = ("WORKBOOK_CHECK_BASELINE", "WORKBOOK_WRITE_BASELINE")   # a sweep never reads or writes baselines


# --------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPoint:
    notebook: str            # absolute path of the .ipynb
    model: str               # the MODEL parameter (local files made absolute: the kernel runs in notebooks/)
    label: str               # the model's folder-safe name
    seed: int
    fast: bool
    params: tuple = ()       # extra (NAME, value) parameters, the same for every point

    @property
    def stem(self) -> str:
        return Path(self.notebook).stem

    def folder(self, out: Path) -> Path:
        return Path(out) / self.stem / self.label / (f"seed{self.seed}" + ("" if self.fast else "_full"))

    @property
    def name(self) -> str:
        return f"{self.stem} | {self.label} | seed {self.seed}" + ("" if self.fast else " | FAST=0")

    def parameters(self) -> dict[str, Any]:
        return {"MODEL": self.model, "SEED": self.seed, "FAST": self.fast, **dict(self.params)}


def find_books(selection: list[str] | None) -> list[Path]:
    """Numbered notebooks by number/name (as `make run NB=..`), or any .ipynb given by its path."""
    from helpers.runner import find_notebooks

    paths = [Path(s).expanduser().resolve() for s in selection or [] if s.endswith(".ipynb") and Path(s).expanduser().is_file()]
    names = [s for s in selection or [] if not (s.endswith(".ipynb") and Path(s).expanduser().is_file())]
    return paths + (find_notebooks(names) if names or not paths else [])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def prepare_models(names: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Resolve every model once, here, before the fan-out: a GGUF file is dequantized into the cache now (one
    process), so the tasks' first loads only read it. Returns [(MODEL parameter, folder label)] and
    {name: error} for the models that cannot be had (their grid points are reported failed, never submitted)."""
    from helpers import models

    ready, errors, labels = [], {}, set()
    for name in names:
        try:
            _, _, display = models.resolve(name)
        except Exception as err:  # ModelNotAvailableError, a bad path ...
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        path = Path(name).expanduser()
        param = str(path.resolve()) if (path.is_file() or path.is_dir()) and not models._is_offline_name(name) else name
        label = _safe(str(display).replace("/", "--"))
        if label in labels:  # two different files with the same name
            label += "-" + hashlib.sha1(param.encode()).hexdigest()[:6]
        labels.add(label)
        ready.append((param, label))
    return ready, errors


def make_grid(books: list[Path], models: list[tuple[str, str]], seeds: list[int], fasts: list[bool],
              params: dict[str, Any] | None = None) -> list[GridPoint]:
    extra = tuple(sorted((params or {}).items()))
    return [GridPoint(str(b), m, label, s, f, extra)
            for b, (m, label), s, f in itertools.product(books, models, seeds, fasts)]


def results_file(point: GridPoint, out: Path) -> Path | None:
    """The grid point's results JSON, if its notebook got as far as `results.report`."""
    found = sorted(point.folder(out).glob("*.results.json"))
    return found[0] if found else None


def is_done(point: GridPoint, out: Path) -> bool:
    """Finished before: its results JSON exists and its task record (if any) does not say it failed."""
    if results_file(point, out) is None:
        return False
    task = point.folder(out) / "task.json"
    return not task.is_file() or json.loads(task.read_text()).get("status") == STATUS_OK


def parameters_yaml(params: dict[str, Any]) -> str:
    """The notebook parameters as the YAML file papermill's `-f` reads, types kept: YAML 1.1 (PyYAML) reads a JSON
    float without a dot, such as 1e-05, as the string '1e-05', so the file is written by PyYAML itself."""
    import yaml

    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------- one task
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def task_environment(folder: Path, threads: int, gpu_index: str | None = None) -> dict[str, str]:
    """The notebook kernel's environment: outputs into `folder`, `threads` torch/BLAS threads, no baselines."""
    env = dict(os.environ)
    for flag in BASELINE_FLAGS:
        env.pop(flag, None)
    env.update(MPLBACKEND="Agg", WORKBOOK_FIGURES=str(folder / "figures"), WORKBOOK_RUNS=str(folder),
               WORKBOOK_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYDEVD_DISABLE_FILE_VALIDATION="1")
    if gpu_index is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu_index
    return env


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(log: str) -> str:
    """The exception papermill reports ('ValueError: ...'), with the cell it came from."""
    lines = [_ANSI.sub("", line).rstrip() for line in log.splitlines()]
    lines = [line for line in lines if line.strip()]
    cell = next((line.strip() for line in lines if line.startswith("Exception encountered at")), "")
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*", line)]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return (last[:400] + (f" ({cell.rstrip(':')})" if cell else "")).strip()


def _kill_tree(pid: int) -> None:
    """Kill a process and every descendant (the papermill child and its Jupyter kernel, which runs in its own session)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_point(point: GridPoint, out: str, threads: int | None = None, timeout: float | None = None,
              gpu: bool = False, host_slots: dict[str, int] | None = None) -> dict[str, Any]:
    """One grid point, inside a Dask worker: papermill in a child process, outputs into the point's folder.

    Torch threads: `threads`, else this machine's cores shared out among the task slots (worker threads) that
    the scheduler knows on this host (`host_slots`, from the client), so workers x threads <= cores."""
    from helpers.runner import scrub_metadata

    folder = point.folder(Path(out))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("*.results.json"), folder / "task.json"]:
        stale.unlink(missing_ok=True)   # a result counts only if this run wrote it
    worker_name, nthreads, gpu_index = "", 1, None
    try:
        from distributed import get_worker

        worker = get_worker()
        worker_name, nthreads = str(worker.name), max(1, worker.state.nthreads)
        nthreads = max(nthreads, (host_slots or {}).get(_host(worker.address), 0))
        if gpu and os.environ.get("WORKBOOK_SWEEP_PIN_GPU") == "1":   # our LocalCluster: worker i owns GPU i
            gpu_index = str(worker.name)
    except (ImportError, ValueError):   # called outside a worker (tests, serial use)
        pass
    threads = threads or max(1, _cores() // nthreads)
    params_file = folder / "parameters.yaml"   # papermill reads -f as YAML, where JSON's 1e-05 would be a str
    params_file.write_text(parameters_yaml(point.parameters()))
    executed = folder / Path(point.notebook).name
    cmd = [sys.executable, "-m", "papermill", point.notebook, str(executed), "-f", str(params_file),
           "--cwd", str(Path(point.notebook).parent), "-k", "python3", "--no-progress-bar", "--log-level", "ERROR"]
    t0 = time.time()
    status, error = STATUS_OK, ""
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=task_environment(folder, threads, gpu_index), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            rc, status, error = None, STATUS_TIMEOUT, f"timed out after {timeout:g} s: notebook process tree killed"
    if rc not in (0, None):
        status, error = STATUS_FAILED, error_line((folder / "log.txt").read_text(errors="replace"))
    if executed.exists():
        scrub_metadata(executed)
    if status == STATUS_OK and results_file(point, Path(out)) is None:
        status, error = STATUS_FAILED, "the notebook finished but wrote no results JSON (no results.report call)"
    record = {"point": asdict(point), "name": point.name, "status": status, "error": error,
              "seconds": round(time.time() - t0, 2), "threads": threads, "worker": worker_name,
              "host": os.uname().nodename, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / "task.json").write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------- the engine
def _host(address: str) -> str:
    """'tcp://10.0.0.5:40123' -> '10.0.0.5'."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def host_slots(client) -> dict[str, int]:
    """Task slots (worker threads) per host of the cluster, to share each machine's cores among them."""
    slots: dict[str, int] = {}
    for address, info in client.scheduler_info()["workers"].items():
        slots[_host(address)] = slots.get(_host(address), 0) + int(info.get("nthreads", 1))
    return slots


def local_size(n_tasks: int, workers: int | None = None, threads: int | None = None,
               gpus: int = 0) -> tuple[int, int]:
    """(workers, torch threads per task) for a LocalCluster: workers x threads <= cores, ~5 GB per worker,
    never more workers than tasks; with GPUs one worker per GPU."""
    import psutil

    cores = _cores()
    if workers is None:
        if gpus:
            workers = gpus
        else:
            by_memory = int(psutil.virtual_memory().total / 1e9 // MEMORY_PER_TASK_GB)
            workers = max(1, min(cores // (threads or 1), by_memory, max(n_tasks, 1)))
    threads = threads or max(1, cores // workers)
    return workers, threads


def warm_on_cluster(client, names: list[str]) -> None:
    """On a remote cluster: resolve the models once on one worker too (a shared cache folder is then warm
    before the fan-out; without a shared file system each worker dequantizes once, atomically)."""
    from helpers import models

    def warm(names: list[str]) -> None:
        for name in names:
            try:
                models.resolve(name)
            except Exception:  # reported by the tasks themselves
                pass

    client.submit(warm, names, pure=False, key=f"sweep-warm-{uuid.uuid4().hex[:8]}").result()


def execute(points: list[GridPoint], out: Path, client, threads: int | None, timeout: float | None,
            gpu: bool, progress: bool = True) -> list[dict[str, Any]]:
    """Submit one task per grid point, count them as they finish, report each failure and carry on."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    resources = {"GPU": 1} if gpu else None
    tag = uuid.uuid4().hex[:8]
    slots = None if threads else host_slots(client)
    futures = {}
    for i, p in enumerate(points):
        key = f"sweep-{tag}-{i}-{_safe(p.name)}"
        futures[client.submit(run_point, p, str(out), threads, timeout, gpu, slots, key=key, pure=False,
                              resources=resources, retries=0)] = p
    done = []
    with tqdm(total=len(points), desc="sweep", unit="task", disable=not progress, file=sys.stdout) as bar:
        for fut in as_completed(futures):
            point = futures[fut]
            try:
                record = fut.result()
            except Exception as err:   # the worker died (KilledWorker), the task was cancelled ...
                record = {"point": asdict(point), "name": point.name, "status": STATUS_FAILED,
                          "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400],
                          "seconds": None, "threads": threads, "worker": "", "host": ""}
                point.folder(out).mkdir(parents=True, exist_ok=True)
                (point.folder(out) / "task.json").write_text(json.dumps(record, indent=1))
            done.append(record)
            bar.update(1)
            line = f"{record['status']:<9} {record['name']}" + (f"  ({record['seconds']:.0f} s)" if record["seconds"] else "")
            tqdm.write(line + (f"\n    {record['error']}" if record["error"] else ""), file=sys.stdout)
            sys.stdout.flush()
    return done


# --------------------------------------------------------------------------------------------- the answer
def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def _spread(values: list[Any]) -> dict[str, Any]:
    nums = [v for v in (_number(x) for x in values) if v is not None]
    if not nums:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(nums) / len(nums)
    sd = math.sqrt(sum((x - mean) ** 2 for x in nums) / (len(nums) - 1)) if len(nums) > 1 else 0.0
    return {"n": len(nums), "mean": mean, "sd": sd, "min": min(nums), "max": max(nums)}


def classify(by_setting: dict[str, list[str]]) -> str:
    """How a claim's verdicts vary: 'holds everywhere', 'seed-dependent' (verdicts differ between seeds of one
    model), 'model-dependent' (constant within each model, different between models), 'holds nowhere',
    'no published value', or 'no runs'."""
    verdicts = [v for vs in by_setting.values() for v in vs]
    judged = {k: [v for v in vs if v in ("reproduced", "not reproduced")] for k, vs in by_setting.items()}
    if not verdicts:
        return "no runs"
    if not any(judged.values()):
        return "no published value"
    if any(len(set(vs)) > 1 for vs in judged.values()):
        return "seed-dependent"
    per_model = {vs[0] for vs in judged.values() if vs}
    if per_model == {"reproduced"}:
        return "holds everywhere"
    if per_model == {"not reproduced"}:
        return "holds nowhere"
    return "model-dependent"


def collect(points: list[GridPoint], out: Path) -> dict[str, Any]:
    """Every claim of every grid point, read from its results JSON: {(notebook, key): {setting: [(seed, value, verdict)]}}."""
    settings = []
    claims: dict[tuple[str, str], dict[str, list[tuple[int, Any, str]]]] = {}
    runs = []   # [(point, status)]
    for p in points:
        setting = p.label + ("" if p.fast else " (FAST=0)")
        if setting not in settings:
            settings.append(setting)
        path = results_file(p, out)
        task = p.folder(out) / "task.json"
        status = json.loads(task.read_text()).get("status") if task.is_file() else (STATUS_OK if path else "not run")
        runs.append((p, status))
        if path is None or status != STATUS_OK:
            continue
        payload = json.loads(path.read_text())
        for r in payload["records"]:
            if r.get("kind") == "claim":
                claims.setdefault((payload["notebook"], r["key"]), {}).setdefault(setting, []).append(
                    (p.seed, r.get("value"), r.get("verdict")))
    return {"settings": settings, "claims": claims, "runs": runs}


def summarize(points: list[GridPoint], out: Path = SWEEP, tasks: list[dict] | None = None,
              header: str = "") -> dict[str, Any]:
    """Write out/summary.md, out/summary.json and out/summary.png from the grid points' results JSON; return
    {"rows": [...], "classes": {claim: class}, "markdown": text}."""
    out = Path(out)
    data = collect(points, out)
    settings, claims = data["settings"], data["claims"]
    seeds_of = {s: sorted({p.seed for p in points if p.label + ("" if p.fast else " (FAST=0)") == s}) for s in settings}
    rows, classes = [], {}
    for (nb, key), by_setting in sorted(claims.items()):
        verdicts = {s: [v for _, _, v in by_setting.get(s, [])] for s in settings}
        cls = classify({s: vs for s, vs in verdicts.items() if vs})
        classes[f"{nb}: {key}"] = cls
        for s in settings:
            entries = by_setting.get(s, [])
            spread = _spread([v for _, v, _ in entries])
            rows.append({"notebook": nb, "claim": key, "model": s, "seeds_run": len(entries),
                         "seeds_in_grid": len(seeds_of[s]),
                         "holds": sum(v == "reproduced" for _, _, v in entries),
                         "judged": sum(v in ("reproduced", "not reproduced") for _, _, v in entries),
                         "values": {str(seed): v for seed, v, _ in entries}, **spread, "class": cls})
    md = _markdown(points, out, data, rows, classes, tasks, header)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "classes": classes,
                                                  "runs": [{"name": p.name, "status": s} for p, s in data["runs"]]},
                                                 indent=1, default=str))
    if rows:
        _figure(rows, settings, out / "summary.png")
    return {"rows": rows, "classes": classes, "markdown": md}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def _markdown(points, out, data, rows, classes, tasks, header) -> str:
    runs = data["runs"]
    counts = {}
    for _, status in runs:
        counts[status] = counts.get(status, 0) + 1
    books = sorted({p.stem for p in points})
    lines = ["# Sweep summary", "",
             f"Grid: notebooks {', '.join(books)} x models {', '.join(data['settings'])} x seeds "
             f"{', '.join(str(s) for s in sorted({p.seed for p in points}))} = {len(points)} grid points; "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
             "Computed from the `kind=\"claim\"` records (value, verdict) of each grid point's results JSON.", ""]
    if header:
        lines += [header, ""]
    lines += ["| notebook | claim | model | holds in seeds | value: mean ± sd [min, max] | across the grid |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        holds = f"{r['holds']}/{r['judged']}" if r["judged"] else "no verdict"
        if r["seeds_run"] < r["seeds_in_grid"]:
            holds += f" ({r['seeds_in_grid'] - r['seeds_run']} of {r['seeds_in_grid']} runs missing)"
        value = (f"{_fmt(r['mean'])} ± {_fmt(r['sd'])} [{_fmt(r['min'])}, {_fmt(r['max'])}]" if r["n"] else
                 ", ".join(str(v) for v in r["values"].values())[:60] or "-")
        lines.append(f"| {r['notebook']} | {r['claim'].replace('|', chr(92) + '|')} | {r['model']} | {holds} | {value} | {r['class']} |")
    n_seeds = len({p.seed for p in points})
    n_models = len(data["settings"])
    for title, cls in (("Claims that hold everywhere", "holds everywhere"),
                       ("Claims that depend on the seed (seed-fragile)", "seed-dependent"),
                       ("Claims that depend on the model", "model-dependent"),
                       ("Claims that hold nowhere in the grid", "holds nowhere"),
                       ("Claims without a published value (no verdict)", "no published value")):
        names = [c for c, k in classes.items() if k == cls]
        lines += ["", f"## {title} ({len(names)})"] + [f"- {c}" for c in names]
    caveats = []
    if n_seeds < 2:
        caveats.append("one seed: seed dependence cannot be seen")
    if n_models < 2:
        caveats.append("one model: model dependence cannot be seen")
    if caveats:
        lines += ["", "Note: " + "; ".join(caveats) + "."]
    bad = [t for t in (tasks or []) if t["status"] not in (STATUS_OK, STATUS_SKIPPED)]
    bad += [{"name": p.name, "status": s, "error": ""} for p, s in runs
            if s not in (STATUS_OK,) and not any(t["name"] == p.name for t in tasks or [])]
    if bad:
        lines += ["", "## Grid points without results", "| grid point | status | error |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['status']} | {(t.get('error') or '').replace('|', chr(92) + '|')} |" for t in bad]
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], settings: list[str], path: Path) -> None:
    """Heatmap: claims x models, colour = fraction of seeds in which the claim holds, text = holds/judged."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    claims = list(dict.fromkeys((r["notebook"], r["claim"]) for r in rows))
    grid = np.full((len(claims), len(settings)), np.nan)
    text = [["" for _ in settings] for _ in claims]
    for r in rows:
        i, j = claims.index((r["notebook"], r["claim"])), settings.index(r["model"])
        if r["judged"]:
            grid[i, j] = r["holds"] / r["judged"]
            text[i][j] = f"{r['holds']}/{r['judged']}"
        else:
            text[i][j] = "n/a" if r["seeds_run"] else ""
    labels = [f"{nb[:2]}: {key if len(key) <= 64 else key[:63] + '…'}" for nb, key in claims]
    fig = Figure(figsize=(2.5 + 1.4 * len(settings) + 0.075 * max(len(x) for x in labels), 1.6 + 0.32 * len(claims)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_facecolor("#dddddd")
    for i in range(len(claims)):
        for j in range(len(settings)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(settings)), settings, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(claims)), labels, fontsize=7)
    ax.set_xlabel("model")
    ax.set_title("Seeds in which each claim holds (grey: no verdict or no run)", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of seeds", shrink=0.8)
    fig.savefig(path, dpi=110, metadata={"Software": None})


# --------------------------------------------------------------------------------------------- command line
def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    import dask

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb", nargs="*", help="notebook numbers or names (default: all), or paths to .ipynb files")
    parser.add_argument("--models", nargs="*", help="MODEL values: the offline default, .gguf files, HF folders, hub ids")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="SEED values (default 0 1 2)")
    parser.add_argument("--fast", nargs="*", type=int, choices=(0, 1), default=[1], help="FAST values: 1, 0 or both")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="another notebook parameter for every grid point (VALUE read as JSON if it parses)")
    parser.add_argument("--scheduler", default=dask.config.get("scheduler-address", None),
                        help="address of a running Dask scheduler (default $DASK_SCHEDULER_ADDRESS; none: a LocalCluster)")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: cores / threads, ~5 GB of RAM each)")
    parser.add_argument("--threads", type=int, help="torch threads per task (default: cores / workers)")
    parser.add_argument("--gpus", type=int, default=0, help="every task asks for the worker resource GPU=1; "
                        "a LocalCluster gets this many workers, worker i on GPU i")
    parser.add_argument("--timeout", type=float, help="seconds before a task's notebook is killed and reported")
    parser.add_argument("--resume", action="store_true", help="skip grid points whose results JSON already exists")
    parser.add_argument("--out", type=Path, default=SWEEP, help="output folder (default runs/sweep)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    books = find_books(args.nb)
    from helpers.models import DEFAULT_MODEL

    names = args.models or [DEFAULT_MODEL]
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--param wants NAME=VALUE, got {item!r}")
        params[name] = _value(value)
    t0 = time.perf_counter()
    models, model_errors = prepare_models(names)
    print(f"models resolved (cache warm) in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(label for _, label in models)
          + "".join(f"\n  cannot use {n!r}: {e}" for n, e in model_errors.items()), flush=True)
    points = make_grid(books, models, args.seeds, [bool(f) for f in args.fast], params)
    out = Path(args.out).resolve()
    todo = [p for p in points if not (args.resume and is_done(p, out))]
    tasks = [{"name": p.name, "status": STATUS_SKIPPED, "error": "", "seconds": None} for p in points if p not in todo]
    tasks += [{"name": f"{b.stem} | {n} | seed {s}", "status": STATUS_FAILED, "error": e, "seconds": None}
              for n, e in model_errors.items() for b in books for s in args.seeds]
    print(f"{len(points)} grid points ({len(books)} notebook(s) x {len(models)} model(s) x {len(args.seeds)} seed(s)"
          f" x {len(args.fast)} FAST value(s)): {len(todo)} to run" + (f", {len(points) - len(todo)} already done" if args.resume else ""))
    engine = ""
    if todo:
        from distributed import Client, LocalCluster

        if args.scheduler:
            client = Client(args.scheduler)
            cluster, threads = None, args.threads
            engine = f"Dask scheduler {args.scheduler} ({len(client.scheduler_info()['workers'])} workers)"
            warm_on_cluster(client, [m for m, _ in models])
        else:
            workers, threads = local_size(len(todo), args.workers, args.threads, args.gpus)
            if args.gpus:
                os.environ["WORKBOOK_SWEEP_PIN_GPU"] = "1"   # inherited by the workers
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):   # an OOM-killed notebook is not retried
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None, resources={"GPU": 1} if args.gpus else None,
                                       silence_logs=40)
            client = Client(cluster)
            engine = f"LocalCluster on 127.0.0.1: {workers} workers x {threads} torch threads"
        print(f"engine: {engine}", flush=True)
        try:
            t_fan = time.perf_counter()
            tasks += execute(todo, out, client, threads, args.timeout, bool(args.gpus), progress=not args.no_progress)
            fan_s = time.perf_counter() - t_fan
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        engine += f"; fan-out wall time {fan_s:.1f} s"
    wall = time.perf_counter() - t_start
    header = (f"Engine: {engine}; sweep wall time {wall:.1f} s (`python -m helpers.sweep`, cluster start included)."
              if engine else "Nothing was run: every grid point had its results already (--resume).")
    summary = summarize(points, out, tasks, header)
    print("\n" + summary["markdown"])
    print(f"written: {out / 'summary.md'}" + (f", {out / 'summary.png'}" if summary["rows"] else ""))
    failed = [t for t in tasks if t["status"] not in (STATUS_OK, STATUS_SKIPPED)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
