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
