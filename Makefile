# Set-up commands of the course (see README.md). Every target creates .venv when it is missing
# and re-installs it when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
PORT ?= 8888

.PHONY: venv test test-unit test-notebooks lint run lab clean test-colab gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	@cp requirements.txt $(STAMP)

## make test: lint, unit tests, then every notebook under nbval (quick size without a GPU)
test: venv lint test-unit test-notebooks

lint: venv
	$(BIN)/ruff check helpers tests notebooks
	$(BIN)/ruff format --check helpers tests
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/python -m helpers.tooling.notebooks check

## the GPU tests (marker gpu, tests/gpu) are left out here: `make gpu-check` runs them on a GPU machine
test-unit: venv
	$(BIN)/python -m pytest -m "not gpu" tests

test-notebooks: venv
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=900 --durations=15 notebooks

## make test-colab: the Colab set-up cell and the no-extras notebooks, run the way Colab runs them,
## in .venv-colab (Colab's versions, tests/colab/constraints.txt), plus the data and model-layer unit tests
COLAB_VENV := .venv-colab
COLAB_STAMP := $(COLAB_VENV)/.installed-constraints
COLAB_CONSTRAINTS := tests/colab/constraints.txt
COLAB_UNIT_TESTS := $(wildcard tests/test_data.py tests/test_models.py tests/test_siglip.py tests/test_tiny_clip.py \
	tests/test_tokenization.py \
	tests/test_zeroshot.py)
# 05 (torch.jit/compile/export) and 06 (a C++ extension built against the installed torch, 1-2 min cold) depend on
# the torch build, which cannot match Colab's here; `make test-colab COLAB_SKIP=` runs them too
COLAB_SKIP ?= 05 06

$(COLAB_STAMP): $(COLAB_CONSTRAINTS)
	rm -rf $(COLAB_VENV)
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(COLAB_CONSTRAINTS)
	@cp $(COLAB_CONSTRAINTS) $(COLAB_STAMP)

test-colab: $(COLAB_STAMP)
	COLAB_PARITY=1 COLAB_PARITY_SKIP="$(COLAB_SKIP)" $(COLAB_VENV)/bin/python -m pytest --durations=5 \
		tests/colab $(COLAB_UNIT_TESTS)

## make gpu-check: every GPU branch (GPU tests, notebooks on the GPU, bench) in one command on a lent GPU
## machine, with the interpreter that holds torch (PYTHON, else python3; no .venv); one report in
## build/gpu-check/ (and $OUT/gpu-check/). GPU_CHECK_DRY_RUN=1 rehearses it on the CPU, with .venv unless
## PYTHON is given. See tests/gpu/gpu_check.py and CONTRIBUTING.md (GPU の確認).
GPU_CHECK_OWN_PYTHON := $(filter environment environment\ override command\ line,$(origin PYTHON))
GPU_CHECK_DRY := $(filter 1 true yes on,$(GPU_CHECK_DRY_RUN))
GPU_CHECK_PYTHON := $(if $(GPU_CHECK_OWN_PYTHON),$(PYTHON),$(if $(GPU_CHECK_DRY),$(BIN)/python,python3))

gpu-check: $(if $(and $(GPU_CHECK_DRY),$(if $(GPU_CHECK_OWN_PYTHON),,1)),venv)
	$(GPU_CHECK_PYTHON) tests/gpu/gpu_check.py $(if $(GPU_CHECK_DRY),--dry-run)

## make run: execute every notebook in order, headless; executed copies and a summary under build/
run: venv
	$(BIN)/python -m helpers.tooling.run_notebooks

## make lab: JupyterLab on notebooks/ with the project's kernel
lab: venv
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf build .pytest_cache .ruff_cache
