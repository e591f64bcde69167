import json

import numpy as np
import pytest
import torch

from helpers import results


@pytest.fixture(autouse=True)
def fresh():
    results.clear()
    yield
    results.clear()


@pytest.mark.parametrize("value, expected, tol, verdict", [
    (71.0, 72, 5, "reproduced"), (60.0, 72, 5, "not reproduced"), (0.5, (0.4, None), None, "reproduced"),
    (0.3, (0.4, 0.6), None, "not reproduced"), (True, True, None, "reproduced"), (False, True, None, "not reproduced"),
    (" Paris", " Paris", None, "reproduced"), (3.0, None, None, "-"), (1.05, 1.0, None, "reproduced"),
])
def test_verdicts(value, expected, tol, verdict):
    assert results.verdict(value, expected, tol) == verdict


def test_record_returns_value_and_converts_tensors(tmp_path):
    assert results.record("a", torch.tensor(2.5), expected=2.0, tolerance=1.0, source="paper") == torch.tensor(2.5)
    results.record("b", np.float32(0.25))
    path = results.report("test_nb", folder=tmp_path)
    saved = json.loads(path.read_text())
    assert [r["value"] for r in saved["records"]] == [2.5, 0.25]
    assert saved["records"][0]["verdict"] == "reproduced"
    assert len(results.combined_table(tmp_path)) == 2


def test_bad_record_arguments():
    with pytest.raises(TypeError):
        results.record("", 1)
    with pytest.raises(ValueError):
        results.record("x", 1, expected=1, tolerance=-1)
