# `make setup` builds .venv once (re-runs only when pyproject.toml changes);
# `make test` sets up if needed, then runs ruff and pytest.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATA ?= $(or $(LEUKODIFF_DATA),../shared/data)
# Ten BCCD fields from the VOC test list (never used for training).
DEMO_FIELDS := $(addprefix $(DATA)/bccd/BCCD/JPEGImages/BloodImage_,$(addsuffix .jpg,\
	00007 00011 00015 00016 00018 00019 00021 00031 00033 00041))

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

# The main job: analyse sample smear fields with the shipped models, write the report.
demo: setup
	$(BIN)/leukodiff analyze $(DEMO_FIELDS) --out out/demo --overwrite

clean:
	rm -rf $(VENV) .pytest_cache
