# model-audit: `make demo` and `make test` set up .venv themselves (Python 3.11 + pip).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= audit-workdir

.PHONY: demo test test-fast lint bench ui clean

# torch/torchvision are pinned to the releases that pip installs from this machine's disk
# (other versions download several GB); installed first so the resolver never looks elsewhere.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/model-audit demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check audit flows registry_hooks deploy tests bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/correction.py

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORKDIR))/mlflow.db \
		--default-artifact-root file://$(abspath $(WORKDIR))/mlruns --port 5000

clean:
	rm -rf $(WORKDIR)
