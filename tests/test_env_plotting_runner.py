import matplotlib
import matplotlib.pyplot as plt
import pytest

import helpers
from helpers import env, plotting, runner


@pytest.mark.parametrize("params", [dict(FAST="False"), dict(SEED=True), dict(MODEL=3), dict(DEVICE=0), dict(SEED=1.5)])
def test_wrong_parameter_types_raise(params):
    with pytest.raises(TypeError):
        env.check_parameters(**params)


def test_good_parameters_pass():
    env.check_parameters(MODEL="x", DEVICE=None, SEED=3, FAST=False, OTHER=object())


def test_savefig_is_byte_reproducible(tmp_path):
    paths = []
    for name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        paths.append(plotting.savefig(fig, name, caption="a line", folder=tmp_path))
        plt.close(fig)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert b"Software" not in paths[0].read_bytes()[:400]


def test_savefig_rejects_paths():
    fig = plt.figure()
    with pytest.raises(ValueError):
        plotting.savefig(fig, "../outside")


def test_feature_geometry_checks_shape():
    with pytest.raises(ValueError):
        plotting.feature_geometry_2d([[1, 2, 3]])


def test_runner_selects_notebooks():
    assert [p.stem for p in runner.find_notebooks(["00"])] == ["00_quickstart"]
    with pytest.raises(SystemExit):
        runner.find_notebooks(["99"])


def test_paths_point_into_the_repo():
    assert (helpers.ROOT / "notebooks").is_dir() and helpers.FIGURES.parent == helpers.ROOT


def test_savefig_defaults_to_runs_not_the_committed_figures(monkeypatch):
    monkeypatch.delenv("WORKBOOK_FIGURES", raising=False)
    from helpers import paths

    assert paths.figures_folder() == paths.RUNS / "figures"
    monkeypatch.setenv("WORKBOOK_FIGURES", str(paths.FIGURES))
    assert paths.figures_folder() == paths.FIGURES


def test_runner_kernel_environment(monkeypatch):
    for name in ("WORKBOOK_FIGURES", "WORKBOOK_THREADS", "WORKBOOK_WRITE_BASELINE", "MPLBACKEND"):
        monkeypatch.delenv(name, raising=False)
    runner.kernel_environment(inplace=False, jobs=1, write_baseline=False)
    import os

    assert os.environ["WORKBOOK_FIGURES"].endswith("runs/figures") and "WORKBOOK_WRITE_BASELINE" not in os.environ
    assert os.environ["MPLBACKEND"] == runner.KERNEL_BACKEND      # savefig shows figures itself
    runner.kernel_environment(inplace=True, jobs=2, write_baseline=True)
    assert os.environ["WORKBOOK_FIGURES"] == str(helpers.FIGURES) and os.environ["WORKBOOK_WRITE_BASELINE"] == "1"
    assert int(os.environ["WORKBOOK_THREADS"]) >= 1


def test_scrub_metadata_removes_local_paths(tmp_path):
    import json

    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": [], "metadata": {"papermill": {
        "input_path": "/home/me/nb.ipynb", "output_path": "/home/me/nb.ipynb", "duration": 3.0}}}))
    runner.scrub_metadata(path)
    assert json.loads(path.read_text())["metadata"]["papermill"] == {"duration": 3.0}


def test_combined_report_counts_claims_only(tmp_path, capsys):
    import json

    from helpers import results

    rec = dict(value=1.0, expected=1.0, tolerance=0.1, verdict="as expected", passed=True, kind="control",
               ci=None, se=None, p=None, n=None)
    claim = dict(rec, key="c", verdict="reproduced", kind="claim")
    for name in ("00_a", "01_b"):
        (tmp_path / f"{name}.results.json").write_text(json.dumps(
            {"notebook": name, "context": {"model": "m"}, "records": [dict(rec, key="ctl"), claim]}))
    text = results.combined_report(folder=tmp_path)
    assert "all notebooks" in text and "claims: 2 reproduced, 0 not reproduced" in text
    assert "controls: all 2 as expected" in text


def test_override_sizes_replaces_known_sizes_and_says_so_in_the_context(monkeypatch):
    from helpers import results

    monkeypatch.setattr(results, "_CONTEXT", {})
    ns = {"N_FACTS": 30, "NOISE": 3.0, "ALL_COLS": True}
    assert env.override_sizes(ns, None) == {} and ns["N_FACTS"] == 30
    assert env.override_sizes(ns, {"N_FACTS": 4, "NOISE": 1}) == {"N_FACTS": 4, "NOISE": 1}
    assert ns["N_FACTS"] == 4 and results.context()["sizes"] == {"N_FACTS": 4, "NOISE": 1}
    with pytest.raises(ValueError, match="not one of"):
        env.override_sizes(ns, {"N_FATCS": 4})               # a typo never passes silently
    with pytest.raises(TypeError, match="must be int"):
        env.override_sizes(ns, {"N_FACTS": "4"})
    with pytest.raises(TypeError, match="must be bool"):
        env.override_sizes(ns, {"ALL_COLS": 0})
    with pytest.raises(TypeError, match="dict"):
        env.override_sizes(ns, [("N_FACTS", 4)])
    with pytest.raises(ValueError, match="not one of"):
        env.override_sizes({**ns, "FAST": True}, {"FAST": False})   # a parameter setup() has already used


def test_runner_refuses_to_write_committed_notebooks_with_other_parameters():
    for extra in (["--seed", "1"], ["--fast", "0"], ["--model", "x.gguf"]):
        with pytest.raises(SystemExit, match="--inplace"):
            runner.main(["--inplace", "--nb", "00", *extra])
