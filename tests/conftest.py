"""Shared fixtures: the offline model is loaded once per test session."""
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Notebook kernels started by nbval inherit this: `results.report` then compares each notebook's records with
# tests/baselines/<notebook>.json and fails the results cell on a flipped verdict or a moved number.
os.environ.setdefault("WORKBOOK_CHECK_BASELINE", "1")
os.environ.pop("WORKBOOK_WRITE_BASELINE", None)


def pytest_configure(config):
    """Pin torch threads in every test process (with `make test`, JOBS pytest-xdist workers share the cores)."""
    import torch

    from helpers.env import default_threads

    torch.set_num_threads(default_threads())


@pytest.fixture(scope="session")
def model():
    import helpers

    helpers.setup(0)
    return helpers.load_model(verbose=False)


EIFFEL = "The Eiffel Tower is located in the city of"
