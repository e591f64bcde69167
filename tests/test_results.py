import json

import numpy as np
import pytest
import torch

from helpers import results


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("WORKBOOK_CHECK_BASELINE", raising=False)
    monkeypatch.delenv("WORKBOOK_WRITE_BASELINE", raising=False)
    results.clear()
    yield
    results.clear()


@pytest.mark.parametrize("value, expected, tol, verdict", [
    (71.0, 72, 5, "reproduced"), (60.0, 72, 5, "not reproduced"), (0.5, (0.4, None), None, "reproduced"),
    (0.3, (0.4, 0.6), None, "not reproduced"), (True, True, None, "reproduced"), (False, True, None, "not reproduced"),
    (" Paris", " Paris", None, "reproduced"), (3.0, None, None, "no published value"), (1.05, 1.0, None, "reproduced"),
])
def test_claim_verdicts(value, expected, tol, verdict):
    assert results.verdict(value, expected, tol, kind="claim") == verdict


@pytest.mark.parametrize("kind, ok, bad", [("control", "as expected", "FAILED"), ("check", "pass", "FAIL")])
def test_control_and_check_verdicts(kind, ok, bad):
    assert results.verdict(0.0, 0.0, 1e-6, kind=kind) == ok
    assert results.verdict(0.1, 0.0, 1e-6, kind=kind) == bad


def test_record_returns_value_and_converts_tensors(tmp_path):
    out = results.record("a", torch.tensor(2.5), expected=2.0, tolerance=1.0, source="paper", kind="claim",
                         criterion="ours: within 1", ci=(np.float32(2.0), 3.0), n=10)
    assert out == torch.tensor(2.5)
    results.record("b", np.float32(0.25), kind="measurement")
    saved = results.report("test_nb", folder=tmp_path)
    assert "/" not in repr(saved).replace("saved ", "").split("runs")[0]  # no absolute path in a notebook
    payload = json.loads(saved.path.read_text())
    assert [r["value"] for r in payload["records"]] == [2.5, 0.25]
    assert payload["records"][0]["verdict"] == "reproduced" and payload["records"][0]["kind"] == "claim"
    assert payload["cost"]["peak_memory_gb"] > 0
    assert len(results.combined_table(tmp_path)) == 2


def test_summary_counts_claims_only():
    results.record("c1", 1.0, expected=1.0, tolerance=0.1, kind="claim", source="P", criterion="ours: ±0.1")
    results.record("c2", True, expected=False, kind="claim", source="P")
    results.record("c3", 0.3, kind="claim", source="P")
    results.record("zero vector", 0.0, expected=0.0, tolerance=1e-6, kind="control")
    results.record("rank", 2, expected=1, kind="check")
    line = results.summary_line()
    assert line.startswith("claims: 1 reproduced, 1 not reproduced, 1 without a published value")
    assert "controls: all 1 as expected" in line and "checks: 1 of 1 failed (rank)" in line


@pytest.mark.parametrize("kwargs", [
    dict(kind="claim"),                                                      # a claim needs a source
    dict(kind="claim", source="P", expected=2.0, tolerance=0.1),             # a numeric claim needs a criterion
    dict(kind="claim", source="P", expected=2.0, criterion="Turner: 2x"),    # ... that says paper: or ours:
    dict(kind="control"), dict(kind="check"),                                # controls and checks need expected
    dict(kind="measurement", expected=1.0), dict(kind="finding"),
    dict(kind="measurement", ci=(2, 1)), dict(kind="measurement", p=1.5), dict(kind="measurement", n=0),
    dict(kind="measurement", drift=-1),
])
def test_bad_record_arguments(kwargs):
    with pytest.raises((TypeError, ValueError)):
        results.record("x", 1.0, **kwargs)
    with pytest.raises(TypeError):
        results.record("", 1, kind="measurement")
    with pytest.raises(TypeError):
        results.record("x", 1)  # kind is required


def _run(tmp_path, values: dict, **extra):
    results.clear()
    for key, (value, kw) in values.items():
        results.record(key, value, **kw)
    return json.loads(results.report("nb", folder=tmp_path).path.read_text())


def test_baseline_catches_flips_and_moves(tmp_path):
    claim = dict(kind="claim", source="P", expected=(2.0, None), criterion="ours: ≥ 2")
    base = _run(tmp_path, {"ratio": (3.0, claim), "p": (0.5, dict(kind="measurement", drift=0.2)),
                           "count": (4, dict(kind="measurement"))})
    results.write_baseline(base, folder=tmp_path)
    same = _run(tmp_path, {"ratio": (3.1, claim), "p": (0.65, dict(kind="measurement", drift=0.2)),
                           "count": (4, dict(kind="measurement"))})
    assert results.check_against_baseline(same, folder=tmp_path) == []
    flipped = _run(tmp_path, {"ratio": (1.9, claim), "p": (0.9, dict(kind="measurement", drift=0.2)),
                              "count": (5, dict(kind="measurement")), "new": (1.0, dict(kind="measurement"))})
    problems = "\n".join(results.check_against_baseline(flipped, folder=tmp_path))
    assert "ratio: verdict flipped" in problems and "'reproduced'" in problems
    assert "p: value moved: baseline 0.5, now 0.9" in problems
    assert "count: value moved" in problems and "new: new record" in problems


def test_report_raises_on_regression(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "BASELINES", tmp_path)
    results.record("x", 1.0, kind="measurement")
    monkeypatch.setenv("WORKBOOK_WRITE_BASELINE", "1")
    results.report("nb", folder=tmp_path)
    assert (tmp_path / "nb.json").exists()
    monkeypatch.delenv("WORKBOOK_WRITE_BASELINE")
    monkeypatch.setenv("WORKBOOK_CHECK_BASELINE", "1")
    results.report("nb", folder=tmp_path)  # unchanged: passes
    results.record("x", 1.5, kind="measurement")
    with pytest.raises(results.RegressionError, match="x: value moved"):
        results.report("nb", folder=tmp_path)


def test_baseline_ignores_other_settings(tmp_path):
    results.set_context(model="A", seed=0, fast=True)
    base = _run(tmp_path, {"x": (1.0, dict(kind="measurement"))})
    results.write_baseline(base, folder=tmp_path)
    results.set_context(model="B")
    other = _run(tmp_path, {"x": (9.0, dict(kind="measurement"))})
    assert results.check_against_baseline(other, folder=tmp_path) == []
