"""helpers: the small package every workbook notebook imports.

    import helpers
    helpers.setup(SEED, MODEL=MODEL, DEVICE=DEVICE, FAST=FAST)
    model = helpers.load_model(MODEL, device=DEVICE)

Three layers; a module imports only from its own layer or the ones above it in this list (tests check it):
- infrastructure: paths (leaf), env, models, fast_bridge, interventions, plotting, results, runner, sweep, fullscale;
- shared methods, one concept each: stats, probes, geometry, finetune, editing, toy, sae, graphs, patching,
  calibration;
- one experiment's code, written for its notebook: superposition (01), plateaus (02), linear_rep (03),
  pause (05), function_vectors and lenses (06), steering (08), truth (10), normalization (12). Later notebooks may reuse it (07 perturbs SAE directions with
  plateaus' perturbation curves), but no experiment module imports another.
Heavy libraries (transformers, TransformerLens, peft, scikit-learn) are imported lazily where they are used.
"""
LAYERS: dict[str, tuple[str, ...]] = {
    "infrastructure": ("paths", "env", "models", "fast_bridge", "interventions", "plotting", "results", "runner", "sweep", "fullscale"),
    "shared methods": ("stats", "probes", "geometry", "finetune", "editing", "toy", "sae", "graphs", "patching",
                       "calibration"),
    "experiments": ("superposition", "plateaus", "linear_rep", "pause", "function_vectors", "lenses", "steering",
                    "truth", "normalization"),
}

from helpers import interventions, plotting, results, toy
from helpers.env import DATA, FIGURES, IN_CI, IN_COLAB, ROOT, RUNS, override_sizes, setup
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
    "DATA", "FIGURES", "IN_CI", "IN_COLAB", "ROOT", "RUNS", "setup", "override_sizes",
    "DEFAULT_MODEL", "ModelInfo", "ModelNotAvailableError", "describe", "list_models", "load_hf", "load_model",
    "interventions", "plotting", "results", "toy",
]
