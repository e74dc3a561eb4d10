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

.PHONY: setup test lint demo bench bench-quick inference-only clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	# a new venv needs ~12 GB free (torch's CUDA build): say so before pip fails half-way
	test -x $(BIN)/python || { $(PYTHON) .ci/disk_check.py && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The one torch/torchvision pair that installs from local files on our machines.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[torch,server,dev]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments

# Two pytest-xdist workers (the CI machines have 2 cores): a test file stays on one worker,
# the Ray files share one, PostgreSQL tests use a schema per worker (tests/conftest.py).
test: setup lint
	$(BIN)/pytest -q -n 2 --dist loadgroup

# The main job: analyse sample smear fields with the shipped models, write the report.
demo: setup
	$(BIN)/leukodiff analyze $(DEMO_FIELDS) --out out/demo --overwrite

# Benchmarks against peer detectors, slides and whole slides -> docs/BENCHMARKS.md
# (~30 min: run on an idle machine; `make bench-quick` is the ~3 min smoke test).
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]' torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m benchmarks.run

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick --out out/bench-quick

# The inference-only install (no torch): a throw-away venv with `pip install .`, then
# analyze one field on onnxruntime (the base install needs nothing more); then the
# [server] extra from the same wheel: create a user, start the station, ask it /health.
INFER_VENV ?= /tmp/leukodiff-inference-only
inference-only:
	rm -rf $(INFER_VENV) && $(PYTHON) -m venv $(INFER_VENV)
	$(INFER_VENV)/bin/python -m pip install --quiet .
	! $(INFER_VENV)/bin/python -c "import torch" 2>/dev/null
	$(INFER_VENV)/bin/leukodiff analyze $(word 1,$(DEMO_FIELDS)) --out $(INFER_VENV)/out --backend onnx
	# + the [server] extra from the wheel: migrations and templates ship, the station starts
	$(INFER_VENV)/bin/python -m pip install --quiet '.[server]'
	echo 'a-long-enough-password' | $(INFER_VENV)/bin/leukodiff create-user ada \
		--data-dir $(INFER_VENV)/station --password-stdin
	$(INFER_VENV)/bin/python .ci/station_smoke.py $(INFER_VENV)

clean:
	rm -rf $(VENV) .pytest_cache
