# Set-up commands of the course (see README.md). Every target creates .venv when it is missing
# and re-installs it when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
PORT ?= 8888

.PHONY: venv test test-unit test-notebooks lint run lab clean

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
	$(BIN)/python -m helpers.notebooks check

test-unit: venv
	$(BIN)/python -m pytest tests

test-notebooks: venv
	$(BIN)/python -m pytest --nbval-lax --nbval-cell-timeout=900 notebooks

## make run: execute every notebook in order, headless; executed copies and a summary under build/
run: venv
	$(BIN)/python -m helpers.run_notebooks

## make lab: JupyterLab on notebooks/ with the project's kernel
lab: venv
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf build .pytest_cache .ruff_cache
