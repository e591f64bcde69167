"""Shared fixtures: the offline model is loaded once per test session."""
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


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
