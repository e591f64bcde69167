"""helpers: the small package every workbook notebook imports.

    import helpers
    helpers.setup(SEED, MODEL=MODEL, DEVICE=DEVICE, FAST=FAST)
    model = helpers.load_model(MODEL, device=DEVICE)

Modules: env (paths, seeding), models (loading), interventions (hooks), plotting, results, toy.
"""
from helpers import interventions, plotting, results, toy
from helpers.env import DATA, FIGURES, IN_CI, IN_COLAB, ROOT, RUNS, setup
from helpers.models import (
    DEFAULT_MODEL,
    ModelInfo,
    ModelNotAvailableError,
    describe,
    list_models,
    load_hf,
    load_model,
)

__all__ = [
    "DATA", "FIGURES", "IN_CI", "IN_COLAB", "ROOT", "RUNS", "setup",
    "DEFAULT_MODEL", "ModelInfo", "ModelNotAvailableError", "describe", "list_models", "load_hf", "load_model",
    "interventions", "plotting", "results", "toy",
]
