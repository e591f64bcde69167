"""helpers.sweep on a real Dask LocalCluster (two worker processes on 127.0.0.1).

A tiny notebook, generated here in a temporary folder (so neither nbval nor `make run` ever sees it), records
claims whose verdicts are known in advance: one holds everywhere, one only for seed 0, one only for the
tiny GPT-2 model, one has no published value. The grid runs it over 2 models x 2 seeds; parameters make chosen
seeds raise or sleep.
The last test runs notebook 00 itself, unchanged, on a 2-layer GPT-2 with random weights (another architecture:
LayerNorm, learned positions) through the sweep."""
from __future__ import annotations

import json
import time

import nbformat
import pytest

from helpers import sweep
from helpers.models import DEFAULT_MODEL

TINY_CODE = '''\
# Writes its results JSON in the format of helpers.results.report, without importing helpers (torch): fast.
import json, os, time
if SEED in FAIL_SEEDS:
    raise RuntimeError(f"planned failure at seed {SEED}")
time.sleep(SLEEP)
def claim(key, ok, value):
    return {"key": key, "kind": "claim", "value": value, "source": "test",
            "verdict": {True: "reproduced", False: "not reproduced", None: "no published value"}[ok]}
records = [claim("holds everywhere", True, 1.0),
           claim("holds for seed 0 only", SEED == 0, float(SEED)),
           claim("holds for the tiny model only", "tiny" in MODEL, "tiny" in MODEL),
           claim("no published value", None, 2.0 + SEED),
           {"key": "a measurement", "kind": "measurement", "value": 3.0, "verdict": "-"}]
payload = {"notebook": "tiny", "context": {"model": MODEL, "seed": SEED, "fast": FAST}, "records": records}
with open(os.path.join(os.environ["WORKBOOK_RUNS"], "tiny.results.json"), "w") as f:
    json.dump(payload, f)
'''


def tiny_notebook(folder):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('MODEL = "x"\nDEVICE = None\nSEED = 0\nFAST = True\nFAIL_SEEDS = []\nSLEEP = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(TINY_CODE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "tiny_sweep.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer GPT-2 with random weights, the default model's tokenizer, saved with save_pretrained."""
    from helpers import models

    return models.save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2", n_layers=2, d_model=64,
                                  n_heads=2)


@pytest.fixture(scope="module")
def cluster():
    """A second LocalCluster the tests reach through --scheduler (the "existing scheduler" set-up)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as c:
        yield c


def _tasks(out):
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in out.rglob("task.json")}


def test_classify_and_spread():
    assert sweep.classify({"a": ["reproduced"] * 3, "b": ["reproduced"] * 2}) == "holds everywhere"
    assert sweep.classify({"a": ["reproduced", "not reproduced"], "b": ["reproduced"]}) == "seed-dependent"
    assert sweep.classify({"a": ["reproduced"] * 2, "b": ["not reproduced"] * 2}) == "model-dependent"
    assert sweep.classify({"a": ["not reproduced"]}) == "holds nowhere"
    assert sweep.classify({"a": ["no published value"] * 2}) == "no published value"
    s = sweep._spread([1.0, 3.0, True, "x", None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(5 / 3) and s["min"] == 1.0 and s["max"] == 3.0
    assert sweep.error_line("junk\nException encountered at \"In [2]\":\n\x1b[31mRuntimeError\x1b[0m: boom\n") \
        == 'RuntimeError: boom (Exception encountered at "In [2]")'


def test_parameters_file_keeps_every_type_papermill_reads():
    import yaml

    params = {"MODEL": "/a b/m.gguf", "SEED": 1, "FAST": False, "LR": 1e-5, "SIZES": {"N": 4, "LR": 1e-05},
              "DEVICE": None, "TASKS": ["antonym", "país → capital"], "X": "1e-05"}
    assert yaml.safe_load(sweep.parameters_yaml(params)) == params    # JSON's 1e-05 would come back as a str


def test_grid_two_models_two_seeds_local_cluster(tmp_path, tiny_model, capsys):
    """The default engine (a LocalCluster it starts itself, 2 workers): 2 models x 2 seeds, summary from the JSON."""
    book, out = tiny_notebook(tmp_path), tmp_path / "sweep"
    rc = sweep.main(["--nb", str(book), "--models", DEFAULT_MODEL, str(tiny_model), "--seeds", "0", "1",
                     "--workers", "2", "--threads", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "LocalCluster on 127.0.0.1: 2 workers x 1 torch threads" in printed
    tasks = _tasks(out)
    assert len(tasks) == 4 and {t["status"] for t in tasks.values()} == {"ok"}
    assert len({t["worker"] for t in tasks.values()}) == 2                    # both workers took tasks
    for t in tasks.values():                                                   # each point wrote its own folder
        folder = sweep.GridPoint(**{**t["point"], "params": ()}).folder(out)
        assert (folder / "tiny.results.json").is_file() and (folder / "tiny_sweep.ipynb").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == {"tiny: holds everywhere": "holds everywhere",
                                  "tiny: holds for seed 0 only": "seed-dependent",
                                  "tiny: holds for the tiny model only": "model-dependent",
                                  "tiny: no published value": "no published value"}
    rows = {(r["claim"], r["model"]): r for r in summary["rows"]}
    assert rows[("holds for seed 0 only", "tiny-gpt2")]["holds"] == 1
    assert rows[("holds for the tiny model only", DEFAULT_MODEL)]["holds"] == 0
    assert rows[("no published value", DEFAULT_MODEL)]["mean"] == pytest.approx(2.5)    # values 2 and 3
    md = (out / "summary.md").read_text()
    assert DEFAULT_MODEL in md and "tiny-gpt2" in md and (out / "summary.png").stat().st_size > 1000
    assert "## Claims that depend on the seed (seed-fragile) (1)" in printed          # printed at the end

    # --resume re-runs nothing that finished
    before = {n: t["finished"] for n, t in tasks.items()}
    mtimes = {p: p.stat().st_mtime for p in out.rglob("*.results.json")}
    rc = sweep.main(["--nb", str(book), "--models", DEFAULT_MODEL, str(tiny_model), "--seeds", "0", "1",
                     "--out", str(out), "--resume", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "0 to run, 4 already done" in printed and "engine:" not in printed
    assert {n: t["finished"] for n, t in _tasks(out).items()} == before
    assert {p: p.stat().st_mtime for p in out.rglob("*.results.json")} == mtimes
    assert json.loads((out / "summary.json").read_text())["classes"] == summary["classes"]


def test_failure_is_reported_and_others_finish(tmp_path, cluster, capsys):
    """Through an existing scheduler: seed 1 raises, seed 0 finishes; --resume then re-runs only seed 1."""
    book, out = tiny_notebook(tmp_path), tmp_path / "sweep"
    args = ["--nb", str(book), "--seeds", "0", "1", "--scheduler", cluster.scheduler_address,
            "--threads", "1", "--out", str(out), "--no-progress"]
    rc = sweep.main(args + ["--param", "FAIL_SEEDS=[1]"])
    printed = capsys.readouterr().out
    assert rc == 1
    tasks = _tasks(out)
    status = {t["point"]["seed"]: t["status"] for t in tasks.values()}
    assert status == {0: "ok", 1: "failed"}
    error = next(t["error"] for t in tasks.values() if t["point"]["seed"] == 1)
    assert "RuntimeError: planned failure at seed 1" in error
    assert "RuntimeError: planned failure at seed 1" in printed and "## Grid points without results" in printed
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["seeds_run"] for r in rows} == {1}                               # the failed seed is missing, not wrong
    rc = sweep.main(args + ["--resume"])
    printed = capsys.readouterr().out
    assert rc == 0 and "1 to run, 1 already done" in printed
    assert json.loads((out / "summary.json").read_text())["classes"]["tiny: holds for seed 0 only"] == "seed-dependent"


def test_timeout_kills_and_reports(tmp_path, cluster, capsys):
    book, out = tiny_notebook(tmp_path), tmp_path / "sweep"
    t0 = time.perf_counter()
    rc = sweep.main(["--nb", str(book), "--seeds", "0", "--scheduler", cluster.scheduler_address, "--threads", "1",
                     "--param", "SLEEP=120", "--timeout", "8", "--out", str(out), "--no-progress"])
    capsys.readouterr()
    assert rc == 1 and time.perf_counter() - t0 < 60
    (task,) = _tasks(out).values()
    assert task["status"] == "timed out" and "killed" in task["error"]


def test_notebook_00_on_another_architecture(tmp_path, tiny_model, cluster, capsys):
    """Notebook 00 unchanged on a 2-layer GPT-2 (random weights) through the sweep, FAST."""
    out = tmp_path / "sweep"
    rc = sweep.main(["--nb", "00", "--models", str(tiny_model), "--seeds", "0", "--scheduler",
                     cluster.scheduler_address, "--threads", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    (task,) = _tasks(out).values()
    assert task["status"] == "ok"
    payload = json.loads(next(out.rglob("00_quickstart.results.json")).read_text())
    assert payload["context"]["model"] == "tiny-gpt2" and payload["context"]["seed"] == 0
    assert any(r["kind"] == "claim" for r in payload["records"])
    assert list((out / "00_quickstart" / "tiny-gpt2" / "seed0" / "figures").glob("00_*.png"))
