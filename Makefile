# `make setup` builds .venv once (re-runs only when pyproject.toml changes);
# `make test` sets up if needed, then runs ruff and pytest.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The one torch/torchvision pair that installs from local files on our machines.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests

test: setup lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
