# model-audit: `make demo` and `make test` set up .venv themselves (Python 3.11 + pip).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= audit-workdir

.PHONY: demo test test-fast lint bench ui clean

# Debian packages some tests need, installed with apt-get when missing and this user may (root, or
# passwordless sudo); otherwise nothing is installed, make goes on, and those tests skip saying why.
# $(call APT_INSTALL,<packages>,<shell test that they are there>,<the tests that skip without them>)
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1)
APT_INSTALL = \
	if $(2); then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: $(3) will skip (no $(1))"; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(call APT_GET,$(1)) || { apt-get update -qq && $(call APT_GET,$(1)); }' \
		|| echo "apt-get could not install $(1): $(3) will skip"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo -n sh -c '$(call APT_GET,$(1)) || { apt-get update -qq && $(call APT_GET,$(1)); }' \
		|| echo "apt-get could not install $(1): $(3) will skip"; \
	else echo "not root and no passwordless sudo: $(3) will skip (apt-get install $(1))"; fi

# tests/browser drive Debian's chromium through its chromium-driver.
INSTALL_CHROMIUM := $(call APT_INSTALL,chromium chromium-driver,command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1,browser tests)
# tests/deploy/test_team.py starts PostgreSQL 15 (initdb, pg_ctl: Debian's `postgresql`).
INSTALL_POSTGRES := $(call APT_INSTALL,postgresql,command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1,the team-setup test)

# torch/torchvision are pinned to the releases that pip installs from this machine's disk
# (other versions download several GB); installed first so the resolver never looks elsewhere.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	-@$(INSTALL_CHROMIUM)
	-@$(INSTALL_POSTGRES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/model-audit demo --workdir $(WORKDIR)

# Two pytest-xdist workers: much of the suite waits on real servers starting (MLflow, Prefect,
# uvicorn), which overlaps well on 2 cores; the demo-reading tests share one worker (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

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
