"""What machine this is, parameter checks, seeding, threads, and one `setup()` call that every notebook makes first.

Paths live in the leaf module `helpers.paths` (re-exported here); `setup` imports `plotting` and `results`
lazily, inside the call, so no module imports `env` back at import time."""
from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_URL = "https://github.com/mi-workbook/mi-workbook"


from helpers.paths import BASELINES, DATA, FIGURES, NOTEBOOKS, ROOT, RUNS, figures_folder  # noqa: F401  (re-exported)

IN_COLAB: bool = "google.colab" in sys.modules
IN_CI: bool = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# The parameters every notebook's `parameters` cell defines, with the types they must have.
PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "MODEL": (str,),
    "DEVICE": (str, type(None)),
    "SEED": (int,),
    "FAST": (bool,),
    "SIZES": (dict, type(None)),
}


def check_parameters(**params: Any) -> None:
    """Raise a TypeError naming the parameter when one has the wrong type (papermill passes strings easily)."""
    for name, value in params.items():
        expected = PARAMETER_TYPES.get(name)
        if expected is None:
            continue
        if isinstance(value, bool) and bool not in expected:  # bool is an int: SEED=True is a mistake
            ok = False
        else:
            ok = isinstance(value, expected)
        if not ok:
            names = " or ".join(t.__name__ for t in expected)
            raise TypeError(f"parameter {name} must be {names}, got {type(value).__name__} {value!r}")


def override_sizes(namespace: dict[str, Any], sizes: dict[str, Any] | None) -> dict[str, Any]:
    """Smoke runs of a notebook's full-scale path: replace some of the sizes it has just set.

    Call it right after the sizes (`helpers.override_sizes(globals(), SIZES)`). `sizes` maps upper-case int,
    float or bool names already set in `namespace` (N_FACTS, MAX_LEN ...; not the parameters MODEL, SEED, FAST,
    which `setup` has already used) to values of the same type; any other name or a changed type raises. The overrides are added to the results' context
    (`sizes`), so a reduced run never passes for the real experiment. Returns what was changed ({} for None)."""
    check_parameters(SIZES=sizes)
    if sizes is None:
        return {}
    known = sorted(k for k, v in namespace.items() if isinstance(k, str) and k.isupper() and k not in PARAMETER_TYPES
                   and isinstance(v, (int, float, bool)))
    for name, value in sizes.items():
        if name not in known:      # MODEL, SEED, FAST ... are parameters: setup() has already used them
            raise ValueError(f"SIZES names {name!r}, which is not one of this notebook's sizes: {known}")
        old = namespace[name]
        if type(value) is not type(old) and not (type(old) is float and type(value) is int):
            raise TypeError(f"SIZES[{name!r}] must be {type(old).__name__} like the notebook's {old!r}, "
                            f"got {type(value).__name__} {value!r}")
    namespace.update(sizes)
    if sizes:
        from helpers import results

        results.set_context(sizes=dict(sizes))
        print("sizes overridden (a reduced run, not the experiment): " + ", ".join(f"{k}={v!r}" for k, v in sizes.items()))
    return dict(sizes)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_threads() -> int:
    """Torch threads: $WORKBOOK_THREADS, else the cores this process may use (at most 8), shared out among
    pytest-xdist workers (`make test` runs JOBS notebooks at once: more threads than cores stall each other)."""
    if os.environ.get("WORKBOOK_THREADS"):
        return max(1, int(os.environ["WORKBOOK_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return max(1, min(cores // max(workers, 1), 8))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (None: leave the setting alone), then restore the old count.

    Many small operations (a KV-cached step of a few tokens, a tiny model's training step, the SVD of a
    small matrix) gain almost nothing from a second thread, and when other processes keep the cores busy
    every parallel region waits for the slowest thread: measured here, one thread scored section 1 of
    notebook 05 in 26 s where two took 240 s on a shared 2-core machine."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_device() -> str:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup(seed: int = 0, quiet: bool = True, **params: Any) -> dict[str, Any]:
    """Seed everything, pin torch threads, apply the house plot style, and check the notebook's parameters.

    Pass the notebook's parameters as keywords (`setup(SEED, MODEL=MODEL, FAST=FAST)`): their types are
    checked, and they are remembered by `helpers.results` so every results table says what produced it.
    Returns a small dict describing the run (device, threads, colab, ci).
    """
    check_parameters(SEED=seed, **params)
    seed_everything(seed)
    threads = default_threads()
    torch.set_num_threads(threads)
    if quiet:
        warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    from helpers import plotting, results

    plotting.use_style()
    results.start_clock()
    results.set_context(seed=seed, **{k.lower(): v for k, v in params.items()}, threads=threads)
    info = {
        "device": params.get("DEVICE") or default_device(),
        "threads": threads,
        "torch": torch.__version__,
        "colab": IN_COLAB,
        "ci": IN_CI,
        "root": str(ROOT),
    }
    if not quiet or not IN_CI:
        print("setup: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "root"))
    return info
