"""helpers.fullscale: collecting full-scale runs with their provenance and the default-vs-full table."""
from __future__ import annotations

import json

from helpers import fullscale


def _record(key, kind, value, verdict, passed):
    return {"key": key, "kind": kind, "value": value, "verdict": verdict, "passed": passed}


def _sweep_folder(root, notebook, status, records=None, error="", context=None):
    folder = root / notebook / "SmolLM2-135M-Instruct" / "seed0_full"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"status": status, "error": error, "seconds": 12.5, "threads": 2,
                                                  "finished": "2026-11-29T00:00:00Z"}))
    if records is not None:
        (folder / f"{notebook}.results.json").write_text(json.dumps(
            {"notebook": notebook, "context": context or {"fast": False}, "cost": {"wall_s": 10.0, "peak_memory_gb": 1.5},
             "records": records}))


def test_collect_and_table_mark_changed_verdicts(tmp_path, monkeypatch):
    sweep_out, dest, baselines = tmp_path / "sweep", tmp_path / "full" / "cpu-test", tmp_path / "baselines"
    baselines.mkdir()
    base = [_record("stays", "claim", 1.0, "reproduced", True), _record("flips", "claim", 0.2, "not reproduced", False),
            _record("only default", "claim", 3.0, "reproduced", True), _record("a control", "control", 0, "as expected", True),
            _record("sized at n = 160", "claim", 0.3, "reproduced", True)]
    (baselines / "90_demo.json").write_text(json.dumps({"records": {r.pop("key"): r for r in base}}))   # as baselines
    _sweep_folder(sweep_out, "90_demo", "ok", [
        _record("stays", "claim", 1.1, "reproduced", True), _record("flips", "claim", 0.9, "reproduced", True),
        _record("only full", "claim", 5.0, "not reproduced", False), _record("a control", "control", 0, "as expected", True),
        _record("sized at n = 670", "claim", 0.01, "not reproduced", False)])
    _sweep_folder(sweep_out, "91_slow", "timed out", error="timed out after 60 s")
    _sweep_folder(sweep_out, "92_smoke", "ok", [_record("x", "claim", 1.0, "reproduced", True)],
                  context={"fast": False, "sizes": {"N_FACTS": 4}})

    runs = fullscale.collect(sweep_out, dest)
    assert runs["90_demo"]["summary"] == {"claim": "2/4", "control": "1/1"}
    assert runs["91_slow"]["status"] == "timed out" and "cost" not in runs["91_slow"]
    saved = json.loads((dest / "90_demo.results.json").read_text())
    assert saved["provenance"]["torch"] and saved["provenance"]["task_seconds"] == 12.5
    assert not (dest / "91_slow.results.json").exists()
    assert not (dest / "92_smoke.results.json").exists() and "reduced sizes" in runs["92_smoke"]["status"]
    stamped = saved["provenance"]["collected"]
    monkeypatch.setattr(fullscale, "provenance", lambda: {"commit": "later", "collected": "later"})
    fullscale.collect(sweep_out, dest)                       # the same runs again: their provenance is kept
    assert json.loads((dest / "90_demo.results.json").read_text())["provenance"]["collected"] == stamped

    rows = {r["claim"]: r for r in fullscale.compare("90_demo", saved, json.loads((baselines / "90_demo.json").read_text()))}
    assert rows["flips"]["changes"] and not rows["stays"]["changes"]
    assert rows["only full"]["default_verdict"] == "(not at default scale)"
    assert rows["only default"]["full_verdict"] == "(not at full scale)"
    assert "a control" not in rows
    assert rows["sized at n = 670"]["changes"] and rows["sized at n = 670"]["default"] == "0.3"   # matched by shape

    text = fullscale.table(tmp_path / "full", baselines)
    assert "**0.2 (not reproduced)**" in text and "**0.9 (reproduced)**" in text
    assert "| 91_slow | timed out: timed out after 60 s |" in text
    assert (tmp_path / "full" / "README.md").read_text() == text


def test_smoke_runs_03_on_the_default_model_and_the_rest_on_the_tiny_one(monkeypatch, tmp_path):
    from helpers import sweep

    calls = []
    monkeypatch.setattr(sweep, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(fullscale, "tiny_model_folder", lambda: tmp_path / "tiny")
    assert fullscale.main(["smoke", "--nb", "03", "05", "--timeout", "9", "--out", str(tmp_path)]) == 0
    first, second = calls
    assert first[first.index("--nb") + 1] == "03" and "--models" not in first
    assert any("LRE_RELATIONS=" in a for a in first) and "TOY_STEPS=10" not in first
    assert second[second.index("--nb") + 1:second.index("--models")] == ["05"]
    assert second[second.index("--models") + 1] == str(tmp_path / "tiny") and "TOY_STEPS=10" in second
    assert all(c[:2] == ["--fast", "0"] and "--timeout" in c for c in calls)


def test_smoke_gives_09_its_sizes_on_the_default_model_and_12_its_own_tiny_sweep(monkeypatch, tmp_path):
    from helpers import sweep

    calls = []
    monkeypatch.setattr(sweep, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(fullscale, "tiny_model_folder", lambda: tmp_path / "tiny")
    assert fullscale.main(["smoke", "--nb", "09", "05", "12", "--out", str(tmp_path)]) == 0
    nine, tiny, twelve = calls
    assert nine[nine.index("--nb") + 1] == "09" and "--models" not in nine
    assert json.loads(next(a for a in nine if a.startswith("SIZES="))[6:]) == fullscale.SMOKE_ON_DEFAULT_MODEL["09"]["SIZES"]
    assert tiny[tiny.index("--nb") + 1:tiny.index("--models")] == ["05"] and not any(a.startswith("SIZES=") for a in tiny)
    assert twelve[twelve.index("--nb") + 1:twelve.index("--models")] == ["12"]
    assert json.loads(next(a for a in twelve if a.startswith("SIZES="))[6:]) == fullscale.SMOKE_SIZES["12"]
