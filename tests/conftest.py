"""Shared fixtures: the offline model is loaded once per test session."""
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def model():
    import helpers

    helpers.setup(0)
    return helpers.load_model(verbose=False)


EIFFEL = "The Eiffel Tower is located in the city of"
